"""A generation's events, from the thread that samples (`produce`) to the response that streams them (`Stream`):
server-sent events, the tokens of a frame handed over together."""

import asyncio
import json
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable

from charlm.errors import first_line
from charlm.settings import Sampling

TOP = 10  # candidates sent with every token, and the drawn one if it is not among them
FRAME = 0.01  # seconds of tokens sent together: faster than a screen refreshes


def event(kind: str, data) -> str:
    """One server-sent event."""
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"


class Stream:
    """One generation's events: `send` is called in its worker thread, `body` streams them in the event loop, and
    `done` runs in the event loop once the worker has sent its last."""

    def __init__(self, done: Callable[[], None]):
        self.loop, self.queue, self.done = asyncio.get_running_loop(), asyncio.Queue(), done
        self.stop = threading.Event()  # set when nobody listens any more: the worker stops within a step
        self.pending: list[str] = []  # events not yet handed over
        self.sent = 0.0  # when the last were

    def send(self, kind: str | None, data) -> None:
        """Hand events to the event loop at most every FRAME seconds: one wake-up and one write for all the tokens
        of a frame (the first and the last go at once); kind None: the worker is done."""
        if kind is not None:
            self.pending.append(event(kind, data))
        if kind == "token" and time.perf_counter() - self.sent < FRAME:
            return
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, "".join(self.pending))
            self.pending.clear()
            if kind is None:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, None)
                self.loop.call_soon_threadsafe(self.done)
        except RuntimeError:  # the server has stopped: nobody is listening
            self.stop.set()
        self.sent = time.perf_counter()

    def body(self, start: dict, stopping: Callable[[], bool]) -> AsyncIterator[str]:
        """The response's body: the start event, then the worker's. However the response ends (done, the client
        gone, or never sent at all), the worker is told to stop."""

        async def events():
            yield event("start", start)
            try:
                while (chunk := await self.queue.get()) is not None:
                    yield chunk
                    if stopping():  # the stream ends, so the server can: it waits for open responses
                        yield event("error", {"error": "the server stopped"})
                        break
            finally:  # done, or the client left (Starlette cancels this)
                self.stop.set()

        body = events()
        weakref.finalize(body, self.stop.set)  # a body never iterated (the client left first) runs no finally
        return body


def candidates(names: list[str], probs, n: int, drawn: int) -> tuple[float, list]:
    """The drawn token's probability, and the n most likely tokens of a distribution and the drawn one as [label,
    probability], without those it rules out (one topk and one copy from the tensor: this runs at every token)."""
    values, ids = (t.tolist() for t in probs.topk(min(n, probs.numel())))
    p = values[ids.index(drawn)] if drawn in ids else probs[drawn].item()
    top = [[names[i], float(f"{v:.4g}")] for i, v in zip(ids, values) if v > 0]
    return float(f"{p:.4g}"), top if drawn in ids else [*top, [names[drawn], float(f"{p:.4g}")]]


def produce(net, tokenizer, device: str, prompt_ids: list[int], s: Sampling, stop: threading.Event, send, off) -> None:
    """Sample as `charlm generate` does, sending one event per token until done or asked to stop; with the parts of
    the net that `off` names switched off (`inside.switched_off`), if any."""
    import torch

    from charlm import inside, sampling

    try:
        with inside.switched_off(net, **off):
            idx = torch.tensor([prompt_ids], device=device)
            decoder, count, started = tokenizer.decoder(), 0, time.perf_counter()
            names = [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]
            steps = sampling.generate(net, idx, s, with_probs=True)
            for next_id, probs in steps:
                if stop.is_set():
                    steps.close()  # frees the KV cache now
                    return
                token, probs = next_id.item(), probs[0]
                p, top = candidates(names, probs, TOP, token)
                send("token", {"id": token, "text": decoder.push(token), "label": names[token], "p": p, "top": top})
                count += 1
            seconds = round(time.perf_counter() - started, 3)
            send("end", {"text": decoder.flush(), "tokens": count, "seconds": seconds})
    except Exception as e:  # the stream has begun: the error is its last event
        send("error", {"error": first_line(e, 300)})
    finally:
        send(None, None)
