"""The runs a playground page may pick, by name: the served checkpoint, and each run's last.ckpt under the runs
folder (`checkpoints.runs_under`), with what `checkpoints.facts` says of each; the nets loaded on demand."""

import copy
import threading
from collections import OrderedDict
from pathlib import Path

from charlm import checkpoints
from charlm.errors import HTTPError

KEEP = 2  # nets kept loaded: the served one and the one picked last


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
        for path in checkpoints.runs_under(self.folder):
            if path.resolve().is_relative_to(root):  # a link out of the folder is not served
                found.setdefault(self.name(path), path)
        return found

    def name(self, path: Path) -> str:
        """A run's name: its folder under the runs folder (its file's path there for a checkpoint other than
        last.ckpt), or the served checkpoint's path as given when it lies elsewhere."""
        try:
            inside = path.resolve().relative_to(self.folder.resolve())
        except ValueError:
            return str(path)
        return (inside.parent if inside.name == checkpoints.LAST else inside).as_posix()

    def listing(self) -> list[dict]:
        facts, self.facts = self.facts, {}  # only the files' current versions are kept: a run saves again and again
        listed = []
        for name, path in self.paths().items():
            try:
                key = stat_key(path)
            except HTTPError as e:  # gone since the folder was listed
                listed.append({"name": name, "served": path == self.served, "error": str(e)})
                continue
            self.facts[key] = facts.get(key) or checkpoints.facts(path)
            listed.append({"name": name, "served": path == self.served, **self.facts[key]})
        return listed

    def get(self, name: str | None):
        """A request's own copy of the net (`own_copy`), the tokenizer and the name of the run of that name (None:
        the served one)."""
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
        return own_copy(net), tokenizer, self.name(path)


def stat_key(path: Path) -> tuple:
    """What tells one version of a file from another: a run that saved again is read again."""
    try:
        stat = path.stat()
    except OSError as e:
        raise HTTPError(404, f"{path}: {e.strerror}: pick a run from GET /api/runs") from None
    return str(path), stat.st_mtime_ns, stat.st_size


def own_copy(net):
    """The net's modules copied, its weights shared: a request's KV cache and attention maps are its own."""
    shared = {id(t): t for t in [*net.parameters(), *net.buffers()]}
    return copy.deepcopy(net, memo=shared)
