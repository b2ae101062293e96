"""The prepared corpus: a text file or folder encoded once into a token file that every later run memory-maps.

A prepared corpus is a folder under the cache folder (`--data.cache_dir`, `data/prepared` by default), one per source
path and tokenizer:
  tokens.bin  every token of the text in order: uint8 when the vocabulary fits in 256 ids, else uint16
  meta.json   the format version, the tokenizer and its vocabulary, the token, character and byte counts, how often
              each token occurs, and a fingerprint of every source file (size, mtime, a hash of sampled blocks)
A run whose sources still match the fingerprint opens tokens.bin memory-mapped; otherwise it prepares them again.
Preparation reads the text in bounded chunks (two passes for characters: find the vocabulary, then encode), writes
temporary files and renames them into place, meta.json last, under a lock: a preparation cut short is never used,
and a second run preparing the same text waits for the first and then uses its files.
A folder's text is its *.txt files in path order, with a newline added after any file that does not end with one.
This module is the only one that reads or writes these files; everything in them is checked before it is used.
"""

import codecs
import errno
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from charlm.files import atomic_write, file_kind, lock_folder
from charlm.tokenizers import ByteTokenizer, CharTokenizer, Tokenizer, tokenizer_from_state

FORMAT = 3  # 2: meta.json holds a digest of its fields; 3: and the text's sha256
MAX_META_BYTES = 1 << 26  # far beyond the vocabulary, counts and fingerprints of any corpus
CHUNK = 1 << 23  # bytes read at a time (8 MiB): preparation's memory stays bounded whatever the corpus size
CODE_POINTS = 0x110000
SAMPLE_BLOCK, SAMPLE_BLOCKS = 1 << 16, 64  # the fingerprint hashes 64 blocks of 64 KiB, or all of a smaller file


@dataclass
class Corpus:
    tokens: np.ndarray  # memory-mapped, read-only
    tokenizer: Tokenizer
    folder: Path  # where tokens.bin and meta.json are
    meta: dict


def source_files(path: Path) -> list[Path]:
    """The files a --data.path names: itself, or every *.txt under a folder, sorted by path."""
    kind = file_kind(path)
    if kind == "missing":
        raise FileNotFoundError(f"--data.path {path} does not exist: pass a UTF-8 text file or a folder")
    if kind == "a folder":
        files = []
        for root, folders, names in os.walk(path, onerror=unreadable):
            for name in folders:  # os.walk would leave out a linked folder's texts without a word
                if Path(root, name).is_symlink():
                    raise ValueError(
                        f"--data.path {path}: {Path(root, name)} is a link to a folder, which charlm does not follow: "
                        "copy the folder in, or pass it as --data.path of its own"
                    )
            files += [Path(root, name) for name in names if name.endswith(".txt")]
        files.sort()
        if not files:
            raise FileNotFoundError(f"--data.path {path} is a folder with no .txt file in it: pass a file or a folder")
        for file in files:
            if file_kind(file) != "a regular file":
                raise ValueError(f"--data.path {path}: {file} is {file_kind(file)}, not a regular file: remove it")
        return files
    if kind != "a regular file":
        raise ValueError(f"--data.path {path} is {kind}, not a regular file: pass a text file or a folder")
    return [path]


def unreadable(error: OSError) -> None:
    """os.walk's onerror: a folder it cannot list is an error, not a folder with no text in it."""
    raise OSError(
        f"--data.path: {error.filename} cannot be read ({error.strerror}): make it readable, or move it out"
    ) from None


def fingerprint(file: Path) -> dict:
    """What identifies a source's content cheaply at any size: size, mtime and a hash of sampled blocks."""
    info = file.stat()
    digest = hashlib.blake2b(digest_size=16)
    with open(file, "rb") as f:
        if info.st_size <= SAMPLE_BLOCK * SAMPLE_BLOCKS:
            digest.update(f.read())
        else:
            for i in range(SAMPLE_BLOCKS):
                f.seek(i * (info.st_size - SAMPLE_BLOCK) // (SAMPLE_BLOCKS - 1))
                digest.update(f.read(SAMPLE_BLOCK))
    return {"path": str(file.resolve()), "size": info.st_size, "mtime_ns": info.st_mtime_ns, "hash": digest.hexdigest()}


def cache_folder(path: Path, tokenizer: str, cache_dir: Path) -> Path:
    key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    return cache_dir / f"{path.resolve().name or 'root'}-{tokenizer}-{key}"


def load(path: Path, tokenizer: str, cache_dir: Path) -> Corpus:
    """The prepared corpus of path (a file or a folder of *.txt), prepared first if it is not yet or is stale."""
    files = source_files(path)
    folder = cache_folder(path, tokenizer, cache_dir)
    sources = [fingerprint(f) for f in files]
    if not sum(source["size"] for source in sources):
        raise ValueError(f"--data.path {path} is empty: pass a text file with some content")
    meta = read_meta(folder, tokenizer, sources)
    if meta is None:
        meta = prepare(path, files, tokenizer, folder, sources)
    tokens = np.memmap(folder / "tokens.bin", dtype=meta["dtype"], mode="r")
    return Corpus(tokens, tokenizer_from_state(meta), folder, meta)


def read_meta(folder: Path, tokenizer: str, sources: list[dict]) -> dict | None:
    """meta.json if it describes a whole, current preparation of these sources with this tokenizer, else None.

    A meta.json or tokens.bin that is not a regular file (a link, a FIFO, a device) is no file charlm wrote: refused
    before it is opened. Every field is checked, and the digest over them catches a field changed by hand.
    """
    for name in ("meta.json", "tokens.bin"):
        file = folder / name
        kind = "a symbolic link" if file.is_symlink() else file_kind(file)
        if kind == "missing":
            return None
        if kind != "a regular file" or (name == "meta.json" and file.stat().st_size > MAX_META_BYTES):
            what = kind if kind != "a regular file" else f"a file of {file.stat().st_size:,} bytes"
            raise ValueError(
                f"{file} is {what}, not a file charlm prepared: remove it, and charlm prepares the text again"
            )
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        size = (folder / "tokens.bin").stat().st_size
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("tokenizer") != tokenizer:
        return None
    if meta.get("digest") != meta_digest(meta) or meta.get("sources") != sources:
        return None
    if meta.get("dtype") not in ("uint8", "uint16"):
        return None
    n, counts, itemsize = meta.get("tokens"), meta.get("counts"), np.dtype(meta["dtype"]).itemsize
    if type(n) is not int or n < 1 or size != n * itemsize:
        return None
    if not all(type(meta.get(key)) is int and meta[key] >= 0 for key in ("characters", "bytes")):
        return None
    if not isinstance(meta.get("sha256"), str) or not re.fullmatch("[0-9a-f]{64}", meta["sha256"]):
        return None
    try:
        vocab_size = tokenizer_from_state(meta).vocab_size
    except ValueError:
        return None
    if not isinstance(counts, list) or len(counts) != vocab_size or vocab_size > 256**itemsize:
        return None
    if not all(type(c) is int and c >= 0 for c in counts) or sum(counts) != n:
        return None
    if vocab_size < 256**itemsize and max_token(folder / "tokens.bin", meta["dtype"]) >= vocab_size:
        return None  # ids the vocabulary does not have: the token file was changed after it was written
    return meta


def meta_digest(meta: dict) -> str:
    """A hash of every field of meta.json but itself: a vocabulary swapped for another of the same size changes it."""
    fields = {k: v for k, v in meta.items() if k != "digest"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def max_token(file: Path, dtype: str) -> int:
    """The largest id in a token file, read in chunks (a memory map would count every page in the run's memory)."""
    largest, buffer = 0, bytearray(CHUNK)
    with open(file, "rb") as f:
        while n := f.readinto(buffer):
            largest = max(largest, int(np.frombuffer(buffer, dtype, n // np.dtype(dtype).itemsize).max()))
    return largest


def prepare(path: Path, files: list[Path], tokenizer: str, folder: Path, sources: list[dict]) -> dict:
    """Encode the sources into folder/tokens.bin and write folder/meta.json, under folder's lock."""
    try:
        lock = lock_folder(folder)  # a second run preparing the same text waits, then finds it prepared
    except OSError as e:
        raise OSError(
            f"--data.cache_dir {folder.parent}: cannot write the prepared corpus there ({e.strerror or e}): "
            "pass --data.cache_dir with a folder you can write"
        ) from None
    with lock:
        meta = read_meta(folder, tokenizer, sources)  # prepared by the run this one waited for
        return meta if meta is not None else write(path, files, tokenizer, folder, sources)


def write(path: Path, files: list[Path], tokenizer: str, folder: Path, sources: list[dict]) -> dict:
    print(f"charlm: preparing {path} into {folder}/ (once; later runs reuse it)", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        with atomic_write(folder / "tokens.bin") as out:
            if tokenizer == "bytes":
                counts, n = encode_bytes(files, out)
                vocab: dict = ByteTokenizer().state()
                dtype = "uint8"
            else:
                code_point_counts = count_code_points(files)
                chars = "".join(map(chr, np.flatnonzero(code_point_counts)))
                if len(chars) > 1 << 16:
                    raise ValueError(
                        f"--data.path {path} has {len(chars):,} distinct characters, more than the 65,536 ids a "
                        "token file holds: pass --data.tokenizer bytes"
                    )
                dtype = "uint8" if len(chars) <= 256 else "uint16"
                n = encode_chars(files, chars, dtype, out)
                counts = code_point_counts[np.flatnonzero(code_point_counts)]
                vocab = CharTokenizer(chars).state()
            if [fingerprint(f) for f in files] != sources:
                raise ValueError(
                    f"--data.path {path} changed while it was being prepared: run again once it is written"
                )
            (folder / "meta.json").unlink(missing_ok=True)  # never an old meta.json beside a new tokens.bin
        continuation = int(counts[0x80:0xC0].sum()) if tokenizer == "bytes" else 0  # UTF-8's non-leading bytes
        meta = {
            "format": FORMAT,
            **vocab,
            "dtype": dtype,
            "tokens": n,
            "characters": n - continuation,
            "bytes": sum(s["size"] for s in sources) + sum(newline_after(files)),
            "counts": [int(c) for c in counts],
            "sources": sources,
            "sha256": text_sha256(files),
        }
        meta["digest"] = meta_digest(meta)
        with atomic_write(folder / "meta.json", "w") as f:
            f.write(json.dumps(meta, ensure_ascii=False))
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OSError(
                f"the disk is full: preparing {path} in {folder}/ stopped and its partial files were removed: free "
                "some space, or pass --data.cache_dir on another disk"
            ) from None
        raise OSError(f"preparing {path} in {folder}/ failed ({e.strerror or e}): nothing was kept") from None
    seconds = time.perf_counter() - start
    print(f"charlm: prepared {n:,} tokens, a vocabulary of {len(counts)}, in {seconds:.1f} s", file=sys.stderr)
    return meta


def newline_after(files: list[Path]) -> list[bool]:
    """Whether the text gets a newline after each file: after every one but the last that does not end with one."""
    ends = []
    for file in files[:-1]:
        with open(file, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            ends.append(size > 0 and os.pread(f.fileno(), 1, size - 1) != b"\n")
    return [*ends, False]


def chunks(files: list[Path]):
    """(file, offset, bytearray) for the sources in order, CHUNK bytes at a time; an empty one ends each file, and the
    newline that separates a file from the next comes as a chunk of its own, from file None."""
    for file, newline in zip(files, newline_after(files)):
        with open(file, "rb") as f:
            offset = 0
            while n := f.readinto(chunk := bytearray(CHUNK)):  # writable, so torch can count it without a copy
                del chunk[n:]
                yield file, offset, chunk
                offset += n
            yield file, offset, bytearray()
        if newline:
            yield None, 0, bytearray(b"\n")


def text_sha256(files: list[Path]) -> str:
    """The sha256 of the text as trained: the files in order, with the newlines put between them."""
    digest = hashlib.sha256()
    for _, _, chunk in chunks(files):
        digest.update(chunk)
    return digest.hexdigest()


def code_points(files: list[Path]):
    """Each chunk of the sources as its Unicode code points: the chunk itself where it is ASCII (the common case: no
    decoding needed), else a uint32 array. A file that is not UTF-8 is an error that names it and the byte offset."""
    utf8 = codecs.getincrementaldecoder("utf-8")()  # keeps a character split between two chunks
    for file, offset, chunk in chunks(files):
        pending = len(utf8.getstate()[0])
        if file is None or chunk and not pending and chunk.isascii():
            yield chunk
            continue
        try:
            text = utf8.decode(chunk, final=not chunk)
        except UnicodeDecodeError as e:
            raise ValueError(
                f"--data.path {file} is not UTF-8 (byte offset {offset - pending + e.start}): convert it to UTF-8, "
                "or pass --data.tokenizer bytes"
            ) from None
        yield np.frombuffer(text.encode("utf-32-le"), np.uint32)


def count_code_points(files: list[Path]) -> np.ndarray:
    counts = np.zeros(CODE_POINTS, np.int64)
    for points in code_points(files):
        if isinstance(points, np.ndarray):
            counts += np.bincount(points, minlength=CODE_POINTS)
        else:
            counts[:256] += byte_counts(points)
    return counts


def byte_counts(chunk) -> np.ndarray:
    # torch counts uint8 as it is: numpy's bincount converts it to int64 first, several times slower
    return torch.bincount(torch.frombuffer(chunk, dtype=torch.uint8), minlength=256).numpy() if chunk else 0


def encode_chars(files: list[Path], chars: str, dtype: str, f: BinaryIO) -> int:
    """Write the ids of the sources' characters to f; returns how many."""
    table = np.zeros(CODE_POINTS, dtype)
    table[[ord(c) for c in chars]] = np.arange(len(chars))
    ascii_table = table[:256].astype(np.uint8).tobytes()  # for bytes.translate, faster than numpy's lookup
    n = 0
    for points in code_points(files):
        if isinstance(points, np.ndarray):
            f.write(table[points])
        elif dtype == "uint8":
            f.write(points.translate(ascii_table))
        else:
            f.write(table[np.frombuffer(points, np.uint8)])
        n += len(points)
    return n


def encode_bytes(files: list[Path], f: BinaryIO) -> tuple[np.ndarray, int]:
    """Copy the sources' bytes to f; returns how often each byte value occurs, and how many bytes there are."""
    counts, n = np.zeros(256, np.int64), 0
    for _, _, chunk in chunks(files):
        f.write(chunk)
        counts += byte_counts(chunk)
        n += len(chunk)
    return counts, n
