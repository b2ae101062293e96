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

In parts, one job each: this module is the command (the socket, uvicorn); `app` the routes and the request bodies;
`catalogue` the runs a page may pick (the checkpoint format is `checkpoints`' business); `stream` a generation's
events, from its worker thread to the response.
"""

import errno
import socket
import sys
from pathlib import Path

from jsonargparse.typing import PositiveInt, restricted_number_type

from charlm.errors import HTTPError
from charlm.settings import Device

LOCAL = ("127.0.0.1", "localhost", "::1")
Port = restricted_number_type("Port", int, [(">=", 0), ("<=", 65535)])


def serve(
    ckpt_path: str = "last",
    runs: str = "checkpoints",
    host: str = "127.0.0.1",
    port: Port = 8000,
    device: Device = "auto",
    max_prompt: PositiveInt = 4000,
    max_new_tokens: PositiveInt = 10000,
    max_clients: PositiveInt = 16,
    allowed_hosts: list[str] | None = None,
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
        allowed_hosts: the names other machines reach this one by, with --host 0.0.0.0 (for example
            '[mybox.lan]'): a request for any Host but these, --host and this machine's own names is refused, as a
            page on another site could make one through the user's browser.
    """
    try:
        import starlette  # noqa: F401  (the app's: checked here, before a model is loaded)
        import uvicorn
    except ImportError:
        raise OSError("charlm serve needs uvicorn and starlette: pip install -e '.[serve]'") from None
    from charlm import checkpoints
    from charlm.serve.app import playground
    from charlm.serve.catalogue import Runs
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
    hosts = {*LOCAL, host, *(allowed_hosts or [])}
    if host not in LOCAL:
        print(
            f"charlm: warning: listening on {host}: anyone who can reach this machine can use it, by the names "
            f"{', '.join(sorted(hosts))} (--allowed_hosts adds more)",
            file=sys.stderr,
        )
    address = listener.getsockname()
    shown = f"[{address[0]}]" if ":" in address[0] else address[0]
    print(f"charlm: serving {served} on {device}", file=sys.stderr)
    print(f"charlm: playground at http://{shown}:{address[1]}  (Ctrl-C stops it)", flush=True)
    app = playground(catalogue, max_prompt, max_new_tokens, max_clients, hosts, stopping=lambda: server.should_exit)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    server.run(sockets=[listener])  # a Ctrl-C is raised again once it has stopped: exit 130
