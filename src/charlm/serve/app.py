"""The playground's Starlette app: the page, and the API's routes with their request bodies, checked by the same
code as every surface's settings (`charlm.settings`). Imported by `serve` once it knows Starlette is there."""

import asyncio
import json
import threading
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import torch
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from charlm import inside
from charlm.errors import HTTPError
from charlm.models import GPT
from charlm.serve.catalogue import Runs
from charlm.serve.stream import Stream, produce
from charlm.settings import Sampling, bounded, describe, from_json, known_text
from charlm.tokenizers import labels


@dataclass(eq=False)
class Switches:
    """What a request switches off in a GPT: heads as [layer, head] pairs, whole layers' attention or MLPs as layer
    numbers, from 0 (`inside.switched_off`)."""

    off_heads: list | None = bounded(None, low=0, high=4096)
    off_attention: list | None = bounded(None, low=0, high=256)
    off_mlp: list | None = bounded(None, low=0, high=256)

    def switched(self, net, name: str) -> dict:
        """The parts to switch off, as `inside.switched_off` takes them, once they are of the right kinds."""
        off = {"heads": self.off_heads or [], "attention": self.off_attention or [], "mlp": self.off_mlp or []}
        if any(off.values()) and not isinstance(net, GPT):
            raise HTTPError(422, f"run {name!r} is a {type(net).__name__}: it has no heads or blocks to switch off")
        layers = all(type(v) is int for v in (*off["attention"], *off["mlp"]))
        if not layers or not all(
            isinstance(p, list) and len(p) == 2 and all(type(v) is int for v in p) for p in off["heads"]
        ):
            raise HTTPError(422, "off_heads: [layer, head] pairs; off_attention and off_mlp: layer numbers, from 0")
        try:
            inside.check_parts(net, **off)
        except ValueError as e:
            raise HTTPError(422, str(e)) from None
        return off


@dataclass(eq=False)
class GenerateRequest(Switches, Sampling):
    """POST /api/generate's body: the generation settings, the run (a name from GET /api/runs; none: the served
    one), and what to switch off while generating."""

    run: str | None = bounded(None, low=0, high=1000)


@dataclass(eq=False)
class AttentionRequest:
    """POST /api/attention's body: the run, the text (as characters or as token ids) and the position to look from
    (none: the last)."""

    run: str | None = bounded(None, low=0, high=1000)
    text: str | None = bounded(None, low=1)
    ids: list | None = bounded(None, low=1)
    pos: int | None = bounded(None, low=0)


@dataclass(eq=False)
class InsideRequest(Switches, AttentionRequest):
    """POST /api/surprise's and /api/heads's body: a text as for /api/attention, and what to switch off."""


class Guard:
    """Refuse what a page on another site could make the user's browser send: a request for another Host (DNS
    rebinding), a request from another origin or from "null", a POST that is not JSON (a form's "simple" request,
    which no browser asks leave for first). A 403 or 415 and one line; no CORS header is ever sent."""

    def __init__(self, app, hosts: set[str]):
        self.app, self.hosts = app, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            host, origin = headers.get("host", ""), headers.get("origin")
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            refusal = None
            if hostname(host) not in self.hosts:
                names = ", ".join(sorted(self.hosts))
                refusal = 403, f"Host {host[:100]!r} is not this server's: open it by one of {names}"
            elif origin is not None and origin.lower() != f"http://{host.lower()}":
                refusal = 403, f"a request from {origin[:100]!r}, another site's page, is refused: open the playground"
            elif scope["method"] == "POST" and kind != "application/json":
                refusal = 415, f"the body is {kind or 'untyped'}: send JSON, with Content-Type: application/json"
            if refusal:
                await JSONResponse({"error": refusal[1]}, status_code=refusal[0])(scope, receive, send)
                return
        await self.app(scope, receive, send)


def hostname(host: str) -> str | None:
    """A Host header's name, lowercased, without its port and an IPv6 address's brackets (None: no name)."""
    try:
        return urlsplit(f"//{host}").hostname
    except ValueError:  # such as "[::1"
        return None


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


def playground(
    runs: Runs, max_prompt: int, max_new_tokens: int, max_clients: int, hosts: set[str], stopping=lambda: False
):
    """The Starlette app: the page and the API, for requests whose Host is one of `hosts` (`Guard`); `stopping()`
    says when the server is shutting down, and every stream then ends."""
    longest = max_prompt + max_new_tokens  # the longest text the page holds
    body_limit = 16 * longest + 4096  # room for that text as escaped characters or as ids
    limits = {"prompt": max_prompt, "max_new_tokens": max_new_tokens}
    places = {"text": longest, "ids": longest, "pos": longest - 1}
    # a generation holds a slot from its acceptance to its worker's end: taken and checked with no await between
    slots = anyio.CapacityLimiter(max_clients)

    async def list_runs(request):
        listing = await asyncio.to_thread(runs.listing)
        return JSONResponse(
            {
                "runs": listing,
                "device": runs.device,
                "settings": describe(Sampling, limits),
                "max_clients": max_clients,
                "generating": slots.borrowed_tokens,
            }
        )

    async def generate(request):
        s = settings_of(await read_body(request, body_limit), GenerateRequest, limits)
        slot = object()
        try:
            slots.acquire_on_behalf_of_nowait(slot)
        except anyio.WouldBlock:
            raise HTTPError(
                429, f"{max_clients} generations are running, the most this server runs at once: try again soon"
            ) from None
        try:
            net, tokenizer, name = await asyncio.to_thread(runs.get, s.run)
            off = s.switched(net, name)
            prompt = s.usable_prompt(tokenizer, "")
        except ValueError as e:
            slots.release_on_behalf_of(slot)
            raise HTTPError(422, str(e)) from None
        except BaseException:
            slots.release_on_behalf_of(slot)
            raise
        prompt_ids = tokenizer.encode(prompt)
        stream = Stream(done=lambda: slots.release_on_behalf_of(slot))
        args = (net, tokenizer, runs.device, prompt_ids, s, stream.stop, stream.send, off)
        threading.Thread(target=produce, args=args, daemon=True).start()
        start = {"run": name, "prompt": prompt, "ids": prompt_ids, "labels": labels(tokenizer, prompt_ids)}
        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream.body(start, stopping), media_type="text/event-stream", headers=headers)

    async def looked_at(request, cls=AttentionRequest, gpt=True):
        """A request for a look at a text: its settings, the run's net, tokenizer and name, the text's ids and the
        position to look from (the last unless pos says), the window the model reads up to there, and its start."""
        s = settings_of(await read_body(request, body_limit), cls, places)
        net, tokenizer, name = await asyncio.to_thread(runs.get, s.run)
        if gpt and not isinstance(net, GPT):
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
        return s, net, tokenizer, name, ids, pos, ids[first : pos + 1], first

    async def attention(request):
        s, net, tokenizer, name, ids, pos, window, first = await looked_at(request)

        def weights():
            with torch.inference_mode():
                maps = net.attention(torch.tensor([window], device=runs.device))
            return maps[:, 0, :, -1].double().cpu().round(decimals=5).tolist()  # (n_layer, n_head, len(window))

        maps = await asyncio.to_thread(weights)
        return JSONResponse(
            {"run": name, "pos": pos, "first": first, "labels": labels(tokenizer, window), "weights": maps}
        )

    async def lens(request):
        """What each depth predicts after position pos: ten candidates a row, and where the character that comes
        next in the text (if one does) ranks."""
        s, net, tokenizer, name, ids, pos, window, first = await looked_at(request)
        probs = await asyncio.to_thread(inside.lens, net, window)
        names = [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]
        following = ids[pos + 1] if pos + 1 < len(ids) else None
        rows = []
        for row in probs:
            top = [[names[i], float(f"{p:.4g}")] for p, i in zip(*(t.tolist() for t in row.topk(min(10, row.numel()))))]
            rank = None if following is None else int((row > row[following]).sum()) + 1
            p = None if following is None else float(f"{row[following].item():.4g}")
            rows.append({"top": top, "rank": rank, "p": p})
        depths = ["embedding", *(f"block {n + 1}" for n in range(len(rows) - 1))]
        return JSONResponse({"run": name, "pos": pos, "first": first, "depths": depths, "rows": rows})

    async def surprise(request):
        """The loss in bits of each character after the first; with parts switched off, also the loss without."""
        s, net, tokenizer, name, ids, *_ = await looked_at(request, InsideRequest, gpt=False)
        off = s.switched(net, name)

        def measure():
            bits = inside.surprise(net, ids)
            if not any(off.values()):
                return {"bits": bits}
            with inside.switched_off(net, **off):
                return {"bits": inside.surprise(net, ids), "base_bits": bits}

        answer = await asyncio.to_thread(measure)
        means = {f"mean_{key}": sum(bits) / max(1, len(bits)) for key, bits in answer.items()}
        rounded = {key: [round(b, 5) for b in bits] for key, bits in answer.items()}
        return JSONResponse({"run": name, "ids": ids, "labels": labels(tokenizer, ids), **rounded, **means})

    async def heads(request):
        """What each head does over the text, measured (`inside.roles`)."""
        s, net, tokenizer, name, ids, *_ = await looked_at(request, InsideRequest)
        found = await asyncio.to_thread(inside.roles, net, tokenizer, ids)
        rows = [[{"role": role, "score": score, "scores": scores} for role, score, scores in row] for row in found]
        return JSONResponse({"run": name, "characters": len(ids), "heads": rows})

    async def refused(request, exc):
        if isinstance(exc, HTTPError):
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        return JSONResponse({"error": f"{request.url.path}: {exc.detail}"}, status_code=exc.status_code)

    page = Path(str(files("charlm") / "playground"))
    return Starlette(
        routes=[
            Route("/api/runs", list_runs),
            Route("/api/generate", generate, methods=["POST"]),
            Route("/api/attention", attention, methods=["POST"]),
            Route("/api/lens", lens, methods=["POST"]),
            Route("/api/surprise", surprise, methods=["POST"]),
            Route("/api/heads", heads, methods=["POST"]),
            Route("/", lambda request: FileResponse(page / "index.html")),
            Mount("/static", StaticFiles(directory=page)),
        ],
        exception_handlers={HTTPError: refused, HTTPException: refused},
        middleware=[Middleware(Guard, hosts={name.lower() for name in hosts})],
    )
