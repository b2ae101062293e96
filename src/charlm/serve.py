"""`charlm serve`: a playground in the browser. Type a prompt, watch the text stream, click a character to see the
distribution it was drawn from and where it attended.

One process serves one page (`playground/`: static files, nothing loaded from the internet) and the HTTP API that
the page uses and people can curl:
- GET /api/runs: the runs the page may pick: the served checkpoint and every run's last.ckpt under the runs folder;
- POST /api/generate: server-sent events, one per token: its text, its probability and the top candidates of the
  distribution it was drawn from (the sampling code, seed and settings of `charlm generate`, so the same text);
- POST /api/attention: how much one position of a text attends to each position before it, per layer and head.

Every request names its run (or takes the served one): a name from the listing, never a path, so nothing outside the
runs folder can be reached from a browser. Each generation runs in a thread of its own on its own copy of the net's
modules (the weights are shared, the KV cache is each generation's own) and stops within a step of its client
leaving.
"""

import asyncio
import copy
import errno
import json
import socket
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from jsonargparse.typing import PositiveInt, restricted_number_type

from charlm.errors import first_line
from charlm.settings import Device, Sampling, bounded, describe, from_json, known_text

LOCAL = ("127.0.0.1", "localhost", "::1")
Port = restricted_number_type("Port", int, [(">=", 0), ("<=", 65535)])
TOP = 10  # candidates sent with every token, and the drawn one if it is not among them
FRAME = 0.01  # seconds of tokens sent together: faster than a screen refreshes
KEEP = 2  # nets kept loaded: the served one and the one picked last


class HTTPError(Exception):
    """A request the API refuses: its status code and one line that names the value and the fix."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def serve(
    ckpt_path: str = "last",
    runs: str = "checkpoints",
    host: str = "127.0.0.1",
    port: Port = 8000,
    device: Device = "auto",
    max_prompt: PositiveInt = 4000,
    max_new_tokens: PositiveInt = 10000,
    max_clients: PositiveInt = 16,
) -> None:
    """Serve a playground page for trained checkpoints: type, watch the text stream, see what the model weighed.

    Args:
        ckpt_path: the run the page opens with: a .ckpt file, a folder, last (the newest run under --runs) or best.
        runs: the folder whose runs (each run's last.ckpt, one or two folders down) the page may switch to.
        host: the address to listen on; anything but 127.0.0.1 lets other machines use the model.
        port: the port to listen on (0: any free one, printed).
        device: where the models run: auto is a CUDA GPU, then Apple's MPS, then the CPU.
        max_prompt: the longest prompt a request may send, in characters.
        max_new_tokens: the most tokens one request may ask for.
        max_clients: the most generations at once (each has a thread and a KV cache); one more is answered 429.
    """
    try:
        import starlette  # noqa: F401  (the app's: checked here, before a model is loaded)
        import uvicorn
    except ImportError:
        raise OSError("charlm serve needs uvicorn and starlette: pip install -e '.[serve]'") from None
    from charlm import checkpoints
    from charlm.settings import pick_device

    device = pick_device(device)
    folder = Path(runs)
    served = checkpoints.resolve(ckpt_path, folder)
    catalogue = Runs(folder, served, device)
    try:
        catalogue.get(None)  # a checkpoint that cannot be served is said now, not at the first request
    except HTTPError as e:
        raise ValueError(str(e)) from None
    try:
        listener = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise OSError(
                f"cannot listen on {host}:{port}: the port is in use: pass --port another (0 picks a free one)"
            ) from None
        raise OSError(
            f"cannot listen on {host}: it is no address of this machine: use 127.0.0.1, or one of its own"
        ) from None
    if host not in LOCAL:
        print(f"charlm: warning: listening on {host}: anyone who can reach this machine can use it", file=sys.stderr)
    address = listener.getsockname()
    shown = f"[{address[0]}]" if ":" in address[0] else address[0]
    print(f"charlm: serving {served} on {device}", file=sys.stderr)
    print(f"charlm: playground at http://{shown}:{address[1]}  (Ctrl-C stops it)", flush=True)
    app = playground(catalogue, max_prompt, max_new_tokens, max_clients, stopping=lambda: server.should_exit)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    server.run(sockets=[listener])  # a Ctrl-C is raised again once it has stopped: exit 130


class Runs:
    """The checkpoints the page may pick, by name: the served one, and each run's last.ckpt under the folder."""

    def __init__(self, folder: Path, served: Path, device: str):
        self.folder, self.served, self.device = folder, served, device
        self.lock = threading.Lock()
        self.nets: OrderedDict[tuple, tuple] = OrderedDict()  # stat key -> (net, tokenizer), at most KEEP
        self.facts: dict[tuple, dict] = {}  # stat key -> what the listing says of it, read once per version

    def paths(self) -> dict[str, Path]:
        """Each run's name and checkpoint file, found again at every call (runs come and go)."""
        found = {self.name(self.served): self.served}
        root = self.folder.resolve()
        for path in sorted([*self.folder.glob("*/last.ckpt"), *self.folder.glob("*/*/last.ckpt")]):
            if path.resolve().is_relative_to(root) and path.is_file():  # a link out of the folder is not served
                found.setdefault(self.name(path), path)
        return found

    def name(self, path: Path) -> str:
        """A run's name: its folder under the runs folder (its file's path there for a checkpoint other than
        last.ckpt), or the served checkpoint's path as given when it lies elsewhere."""
        try:
            inside = path.resolve().relative_to(self.folder.resolve())
        except ValueError:
            return str(path)
        return (inside.parent if inside.name == "last.ckpt" else inside).as_posix()

    def listing(self) -> list[dict]:
        facts, self.facts = self.facts, {}  # only the files' current versions are kept: a run saves again and again
        listed = []
        for name, path in self.paths().items():
            try:
                key = stat_key(path)
            except HTTPError as e:  # gone since the folder was listed
                listed.append({"name": name, "served": path == self.served, "error": str(e)})
                continue
            self.facts[key] = facts.get(key) or self.describe(path)
            listed.append({"name": name, "served": path == self.served, **self.facts[key]})
        return listed

    def describe(self, path: Path) -> dict:
        """Step, val loss, tokenizer and size of a checkpoint, or its error."""
        from charlm import checkpoints
        from charlm.models import GPT

        try:
            ckpt = checkpoints.read(path)
            cls, config, tokenizer = checkpoints.checked_net(ckpt, path)
        except (OSError, ValueError) as e:
            return {"error": str(e)}
        weights = {t.data_ptr(): t.numel() for t in checkpoints.net_weights(ckpt).values()}  # tied: counted once
        return {
            "net": cls.__name__,
            "attention": cls is GPT,
            "step": ckpt.get("global_step") if type(ckpt.get("global_step")) is int else None,
            "val_loss": val_loss(ckpt),
            "tokenizer": tokenizer.name,
            "vocab_size": tokenizer.vocab_size,
            "block_size": config.get("block_size"),  # a bigram reads one character
            "parameters": sum(weights.values()),
        }

    def get(self, name: str | None):
        """The net (shared: use `own_copy`), tokenizer and file of the run of that name (None: the served one)."""
        from charlm import checkpoints

        paths = self.paths()
        path = self.served if name is None else paths.get(name)
        if path is None:
            raise HTTPError(404, f"run {name[:200]!r} is not one of this server's: pick one from GET /api/runs")
        with self.lock:  # one load of a file, however many requests ask for it at once
            key = stat_key(path)
            if key not in self.nets:
                try:
                    self.nets[key] = checkpoints.load_net(path, self.device)
                except (OSError, ValueError) as e:
                    raise HTTPError(422, f"run {self.name(path)!r}: {e}") from None
                while len(self.nets) > KEEP:
                    self.nets.popitem(last=False)
            self.nets.move_to_end(key)
            net, tokenizer = self.nets[key]
        return net, tokenizer, self.name(path)


def stat_key(path: Path) -> tuple:
    """What tells one version of a file from another: a run that saved again is read again."""
    try:
        stat = path.stat()
    except OSError as e:
        raise HTTPError(404, f"{path}: {e.strerror}: pick a run from GET /api/runs") from None
    return str(path), stat.st_mtime_ns, stat.st_size


def val_loss(ckpt: dict) -> float | None:
    """The val loss at the checkpoint's save, as its ModelCheckpoint kept it (checked: a value from a file)."""
    import torch

    for state in ckpt.get("callbacks", {}).values():
        score = state.get("current_score") if isinstance(state, dict) else None
        if isinstance(score, torch.Tensor) and score.numel() == 1 and score.isfinite().all():
            return round(score.item(), 4)
    return None


def own_copy(net):
    """The net's modules copied, its weights shared: a generation's KV cache and attention maps are its own."""
    shared = {id(t): t for t in [*net.parameters(), *net.buffers()]}
    return copy.deepcopy(net, memo=shared)


@dataclass(eq=False)
class GenerateRequest(Sampling):
    """POST /api/generate's body: the generation settings, and the run (a name from GET /api/runs; none: the served
    one)."""

    run: str | None = bounded(None, low=0, high=1000)


@dataclass(eq=False)
class AttentionRequest:
    """POST /api/attention's body: the run, the text (as characters or as token ids) and the position to look from
    (none: the last)."""

    run: str | None = bounded(None, low=0, high=1000)
    text: str | None = bounded(None, low=1)
    ids: list | None = bounded(None, low=1)
    pos: int | None = bounded(None, low=0)


def settings_of(body: bytes, cls, limits: dict):
    """A request's body as the settings `cls` holds, else a 400 (no JSON object) or a 422 (a field refused)."""
    try:
        given = json.loads(body, parse_constant=lambda name: name)  # NaN and Infinity stay words: no numbers
    except (ValueError, RecursionError) as e:
        reason = "nested too deep" if isinstance(e, RecursionError) else e
        raise HTTPError(400, f'the body is not JSON ({reason}): send an object such as {{"prompt": "Hi"}}') from None
    if not isinstance(given, dict):
        raise HTTPError(400, f'the body is a JSON {type(given).__name__}: send an object such as {{"prompt": "Hi"}}')
    try:
        return from_json(cls, given, limits)
    except ValueError as e:
        raise HTTPError(422, str(e)) from None


async def read_body(request, limit: int) -> bytes:
    """The request's body, refused once it grows past `limit` bytes (a client may send anything)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPError(413, f"the body is over {limit} bytes: send a shorter prompt")
    return bytes(body)


def candidates(names: list[str], probs, n: int, drawn: int) -> tuple[float, list]:
    """The drawn token's probability, and the n most likely tokens of a distribution and the drawn one as [label,
    probability], without those it rules out (one topk and one copy from the tensor: this runs at every token)."""
    values, ids = (t.tolist() for t in probs.topk(min(n, probs.numel())))
    p = values[ids.index(drawn)] if drawn in ids else probs[drawn].item()
    top = [[names[i], float(f"{v:.4g}")] for i, v in zip(ids, values) if v > 0]
    return float(f"{p:.4g}"), top if drawn in ids else [*top, [names[drawn], float(f"{p:.4g}")]]


def produce(net, tokenizer, device: str, prompt_ids: list[int], s: Sampling, stop: threading.Event, send) -> None:
    """Sample as `charlm generate` does, sending one event per token until done or asked to stop."""
    import torch

    from charlm import sampling

    try:
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
        send("end", {"text": decoder.flush(), "tokens": count, "seconds": round(time.perf_counter() - started, 3)})
    except Exception as e:  # the stream has begun: the error is its last event
        send("error", {"error": first_line(e, 300)})
    finally:
        send(None, None)


def playground(runs: Runs, max_prompt: int, max_new_tokens: int, max_clients: int, stopping=lambda: False):
    """The Starlette app: the page and the API; `stopping()` says when the server is shutting down, and every
    stream then ends."""
    import torch
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import FileResponse, JSONResponse, StreamingResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    from charlm.models import GPT
    from charlm.tokenizers import labels

    longest = max_prompt + max_new_tokens  # the longest text the page holds
    body_limit = 16 * longest + 4096  # room for that text as escaped characters or as ids

    workers: set[threading.Thread] = set()  # the generations under way (touched by the event loop's thread only)

    def generating() -> int:
        workers.difference_update([worker for worker in list(workers) if not worker.is_alive()])
        return len(workers)

    async def list_runs(request):
        listing = await asyncio.to_thread(runs.listing)
        settings = describe(Sampling, limits)
        return JSONResponse(
            {"runs": listing, "device": runs.device, "limits": limits, "settings": settings, "generating": generating()}
        )

    async def generate(request):
        s = settings_of(await read_body(request, body_limit), GenerateRequest, limits)
        if generating() >= max_clients:
            raise HTTPError(
                429, f"{max_clients} generations are running, the most this server runs at once: try again soon"
            )
        net, tokenizer, name = await asyncio.to_thread(runs.get, s.run)
        try:
            prompt = s.usable_prompt(tokenizer, "")
        except ValueError as e:
            raise HTTPError(422, str(e)) from None
        prompt_ids = tokenizer.encode(prompt)
        loop, queue, stop = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()

        pending, sent = [], [0.0]  # events not yet handed over, and when the last were

        def send(kind, data):
            """Hand events to the event loop at most every FRAME seconds: one wake-up and one write for all the
            tokens of a frame (the first and the last go at once)."""
            if kind is not None:
                pending.append(f"event: {kind}\ndata: {json.dumps(data)}\n\n")
            if kind == "token" and time.perf_counter() - sent[0] < FRAME:
                return
            try:
                loop.call_soon_threadsafe(queue.put_nowait, "".join(pending))
                pending.clear()
                if kind is None:
                    loop.call_soon_threadsafe(queue.put_nowait, None)
            except RuntimeError:  # the server has stopped: nobody is listening
                stop.set()
            sent[0] = time.perf_counter()

        start = {"run": name, "prompt": prompt, "ids": prompt_ids, "labels": labels(tokenizer, prompt_ids)}
        worker = threading.Thread(
            target=produce, args=(own_copy(net), tokenizer, runs.device, prompt_ids, s, stop, send), daemon=True
        )

        async def events():
            yield f"event: start\ndata: {json.dumps(start)}\n\n"
            worker.start()
            workers.add(worker)
            try:
                while (events := await queue.get()) is not None:
                    yield events
                    if stopping():  # the stream ends, so the server can: it waits for open responses
                        yield 'event: error\ndata: {"error": "the server stopped"}\n\n'
                        break
            finally:  # done, or the client left (Starlette cancels this): the worker stops within a step
                stop.set()

        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    async def attention(request):
        s = settings_of(await read_body(request, body_limit), AttentionRequest, places)
        net, tokenizer, name = await asyncio.to_thread(runs.get, s.run)
        if not isinstance(net, GPT):
            raise HTTPError(422, f"run {name!r} is a {type(net).__name__}, which has no attention: pick a GPT's run")
        if (s.text is None) == (s.ids is None):
            raise HTTPError(422, 'send one of "text" (a string) and "ids" (token ids)')
        if s.text is not None:
            try:
                ids = tokenizer.encode(known_text(tokenizer, s.text, "text"))
            except ValueError as e:
                raise HTTPError(422, str(e)) from None
        else:
            ids = s.ids
            if not all(type(i) is int and 0 <= i < tokenizer.vocab_size for i in ids):
                raise HTTPError(422, f"ids: each must be a whole number in [0, {tokenizer.vocab_size - 1}]")
        pos = len(ids) - 1 if s.pos is None else s.pos
        if pos >= len(ids):
            raise HTTPError(422, f"pos {pos} is past the text's last position, {len(ids) - 1}")
        first = max(0, pos + 1 - net.block_size)  # the model reads at most block_size tokens
        window = ids[first : pos + 1]

        def weights():
            with torch.inference_mode():
                maps = own_copy(net).attention(torch.tensor([window], device=runs.device))
            return maps[:, 0, :, -1].double().cpu().round(decimals=5).tolist()  # (n_layer, n_head, len(window))

        maps = await asyncio.to_thread(weights)
        return JSONResponse(
            {"run": name, "pos": pos, "first": first, "labels": labels(tokenizer, window), "weights": maps}
        )

    async def refused(request, exc):
        if isinstance(exc, HTTPError):
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        return JSONResponse({"error": f"{request.url.path}: {exc.detail}"}, status_code=exc.status_code)

    limits = {"prompt": max_prompt, "max_new_tokens": max_new_tokens}
    places = {"text": longest, "ids": longest, "pos": longest - 1}
    page = Path(str(files("charlm") / "playground"))
    return Starlette(
        routes=[
            Route("/api/runs", list_runs),
            Route("/api/generate", generate, methods=["POST"]),
            Route("/api/attention", attention, methods=["POST"]),
            Route("/", lambda request: FileResponse(page / "index.html")),
            Mount("/static", StaticFiles(directory=page)),
        ],
        exception_handlers={HTTPError: refused, HTTPException: refused},
    )
