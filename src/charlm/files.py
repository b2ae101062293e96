"""How charlm writes a file and holds a folder: one `atomic_write` and one `lock_folder`, used by every writer
(checkpoints, the prepared corpus, the download, the attention picture, the sweep)."""

import fcntl
import os
import re
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_PREFIX = ".saving-"  # never a .ckpt, .bin or .png name: a write cut short is never taken for a finished file
LOCK = ".charlm-lock"  # not .lock: a name of charlm's own, which no user file of the folder has
TEMP_NAME = re.compile(rf"{re.escape(TEMP_PREFIX)}(\d+)-")  # only charlm's own are ever removed, by the writer's pid


@contextmanager
def atomic_write(path: Path, mode: str = "wb") -> Iterator:
    """Yield a new temporary file in `path`'s folder; once the block ends without an exception, flush and fsync it
    and rename it onto `path`. However the block ends, `path` is either the old file or the whole new one.

    Nothing follows a symbolic link: a link at the temporary name is refused, and a link at `path` is replaced by
    the file, its target left as it was. The temporary name holds the process id: no two processes share one.
    """
    path = Path(path)
    tmp = path.parent / f"{TEMP_PREFIX}{os.getpid()}-{path.name}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o666)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def lock_folder(folder: Path, busy: str | None = None):
    """Hold an exclusive lock on `folder` for as long as the returned file stays open.

    If another process holds it: with `busy` (what to do instead), fail at once with an error that says so;
    without, wait for it. The operating system drops the lock when its process ends, however it ends, so a killed
    process never blocks the next one. Once the lock is held, temporary files of writes cut short are removed.
    """
    folder.mkdir(parents=True, exist_ok=True)
    try:  # never through a symlink: the lock file is truncated below, and a link would empty its target
        lock = os.fdopen(os.open(folder / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), "r+")
    except OSError as e:
        raise OSError(
            f"{folder}/{LOCK} cannot be opened ({e.strerror}; a symbolic link is never followed): remove it, charlm "
            "keeps its lock there"
        ) from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        owner = lock.read().strip() or "unknown"
        if busy is not None:
            lock.close()
            raise OSError(f"{folder}/ is in use by another run (pid {owner}): {busy}") from None
        print(f"charlm: waiting for another run (pid {owner}) that is using {folder}/", file=sys.stderr, flush=True)
        fcntl.flock(lock, fcntl.LOCK_EX)
    lock.seek(0)
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    for stale in folder.iterdir():  # a live writer's file is its own (it may write without the lock): kept
        found = TEMP_NAME.match(stale.name)
        if found and stale.is_file() and not alive(int(found.group(1))):
            stale.unlink(missing_ok=True)
    return lock


def alive(pid: int) -> bool:
    """Whether a process of that id runs on this machine."""
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only whether it could be
    except (ProcessLookupError, OverflowError):  # none of that id, or no id a process can have
        return False
    except PermissionError:  # another user's
        return True
    return True


def file_kind(path: Path) -> str:
    """What path is, from stat (following symlinks) alone: opening a FIFO to look would block."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):  # or a file where a folder on its path should be
        return "missing"
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    return "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a special file"


MAX_TEXT_BYTES = 2**20  # far beyond any prompt, config or search space: a bigger one is a mistake (a corpus, a disk)
MAX_YAML_VALUES = 100_000  # far beyond any config: more is aliases nested to expand for minutes ("billion laughs")


def read_text(file: Path, flag: str) -> str:
    """Read a UTF-8 text file, with one-line errors that name the flag it came from and what is wrong with it."""
    kind = file_kind(file)
    if kind == "missing":
        raise FileNotFoundError(f"{flag} {file} does not exist: pass a UTF-8 text file")
    if kind != "a regular file":
        raise ValueError(f"{flag} {file} is {kind}, not a regular file: pass a UTF-8 text file")
    size = file.stat().st_size
    if size > MAX_TEXT_BYTES:
        raise ValueError(
            f"{flag} {file} holds {size:,} bytes, more than the {MAX_TEXT_BYTES:,} charlm reads from such a file: "
            "pass the file you meant"
        )
    raw = file.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag} {file} is not UTF-8 (byte offset {e.start}): convert it to UTF-8") from None


def check_yaml(file: Path, flag: str) -> str:
    """A YAML file's text, once it is known to be a small regular UTF-8 file (`read_text`) whose aliases do not
    expand it past MAX_YAML_VALUES values; any YAML error is one line."""
    import yaml

    text = read_text(file, flag)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)  # an alias is the node it names again: nothing expands
    except yaml.YAMLError as e:
        raise ValueError(f"{flag} {file}: cannot be read as YAML ({' '.join(str(e).split())[:200]}): fix it") from None
    sizes: dict[int, int] = {}  # each distinct node's size with its aliases expanded, counted once per node
    open_nodes: set[int] = set()  # begun, not finished: the path from the root to the node at hand
    stack = [(root, False)] if root is not None else []
    while stack:  # children before parents; a loop, not recursion: nesting may be deep
        node, ready = stack.pop()
        children = node.value if isinstance(node, yaml.SequenceNode) else []
        if isinstance(node, yaml.MappingNode):
            children = [item for pair in node.value for item in pair]
        if ready:
            open_nodes.discard(id(node))
            sizes[id(node)] = min(1 + sum(sizes[id(child)] for child in children), MAX_YAML_VALUES + 1)
        elif id(node) not in sizes and id(node) not in open_nodes:
            if any(id(child) in open_nodes or child is node for child in children):  # an alias inside what it names
                raise ValueError(f"{flag} {file}: an alias names a node it is inside of: write the values out")
            open_nodes.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for child in children if id(child) not in sizes)
    if root is not None and sizes[id(root)] > MAX_YAML_VALUES:
        raise ValueError(
            f"{flag} {file}: its aliases expand it to more than {MAX_YAML_VALUES:,} values: write the values out"
        )
    return text
