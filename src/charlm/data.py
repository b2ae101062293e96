"""Text to batches: the corpus download, training and validation batches, the DataModule.

Data flows one way: text file or folder -> tokenizer -> prepared token file (charlm.corpus, memory-mapped) ->
90/10 split -> batches.
Training draws random windows; validation walks a fixed leading part of the validation split (all of it, when it is
shorter than --data.val_tokens) in fixed windows, so the validation loss is an exact number, the same every time
for the same weights.
With several processes (DDP), each rank takes its own share of every training batch and of the validation windows;
they all read the same memory-mapped file.
"""

import hashlib
import json
import math
import urllib.error
import urllib.request
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from torch.utils.data import DataLoader, Dataset

from charlm import corpus
from charlm.files import atomic_write
from charlm.models import IGNORE_INDEX
from charlm.tokenizers import TOKENIZERS, tokenizer_from_state, visible

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_CACHE = "data/tinyshakespeare/input.txt"  # relative to the working directory


def download(url: str, dest: Path, sha256: str) -> Path:
    """Fetch `url` into `dest` unless it is already there; the file only gets its name once its checksum matches."""
    if dest.is_file():
        return dest
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as e:
        raise OSError(
            f"could not download {url} ({e}): check the network, put a copy of the file at {dest.absolute()}, or pass "
            "--data.path FILE"
        ) from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise OSError(f"{url} has sha256 {digest}, expected {sha256}: nothing was kept, try again later")
    dest.parent.mkdir(parents=True, exist_ok=True)  # only now: a failed download leaves no empty folder behind
    with atomic_write(dest) as f:
        f.write(data)
    return dest


class RandomWindows:
    """Training batches: `batch_size` random windows of `block_size + 1` tokens, split into inputs and targets.

    Batch number n comes from a generator seeded with (seed, n), so the whole sequence of batches is fixed by the
    seed, and a run resumed at step n draws from batch n on, exactly the batches an uninterrupted run would have.
    With `world_size` processes the generator draws world_size * batch_size windows and rank r takes the r-th
    batch_size of them: the ranks train on different windows, together the batch one process of that size would draw.
    One "epoch" is as many batches as it takes to draw the training split's token count once.
    """

    def __init__(
        self,
        data: np.ndarray,
        block_size: int,
        batch_size: int,
        seed: int,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.data = data
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.offsets = torch.arange(block_size + 1)
        self.num_starts = len(data) - block_size
        self.next_batch = start

    def __len__(self) -> int:
        return max(1, len(self.data) // (self.world_size * self.batch_size * (len(self.offsets) - 1)))

    def __iter__(self):
        for _ in range(len(self)):
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.next_batch) % 2**63)
            self.next_batch += 1
            starts = torch.randint(self.num_starts, (self.world_size * self.batch_size, 1), generator=generator)
            starts = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            windows = torch.from_numpy(self.data[(starts + self.offsets).numpy()].astype(np.int64))  # (B, T + 1)
            yield windows[:, :-1], windows[:, 1:]


class ValidationWindows(Dataset):
    """Consecutive non-overlapping windows that predict every token of `data` after the first exactly once.

    The last window is padded, and whole padding windows are added up to a multiple of `multiple` windows; padded
    targets are IGNORE_INDEX, so they add nothing to the loss. A multiple of the world size is what DDP needs:
    Lightning's DistributedSampler then splits the windows evenly instead of repeating some to even the shares.
    Each window is read from `data` (a memory map) when it is asked for: nothing is copied ahead.
    """

    def __init__(self, data: np.ndarray, block_size: int, multiple: int = 1):
        self.data = data
        self.block_size = block_size
        self.num_windows = math.ceil(math.ceil((len(data) - 1) / block_size) / multiple) * multiple

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.num_windows:
            raise IndexError(f"window {i} of {self.num_windows}")
        T = self.block_size
        tokens = torch.from_numpy(self.data[i * T : (i + 1) * T + 1].astype(np.int64))
        n = max(0, len(tokens) - 1)  # targets in this window
        if n == T:
            return tokens[:-1], tokens[1:]
        x, y = torch.zeros(T, dtype=torch.long), torch.full((T,), IGNORE_INDEX, dtype=torch.long)
        x[:n], y[:n] = tokens[:n], tokens[1:]
        return x, y


class CharDataModule(L.LightningDataModule):
    """A corpus split 90/10 into training and validation, prepared once into a memory-mapped token file.

    Args:
        path: a UTF-8 text file, or a folder: every *.txt under it in path order, with a newline after each file that
            does not end with one. By default tiny-shakespeare, downloaded on first use into data/tinyshakespeare/.
        block_size: context length in tokens, the T of every (B, T) batch (the GPT's block_size follows it).
        batch_size: windows per batch, for training and validation.
        train_fraction: the leading part of the text used for training; the rest is validation.
        tokenizer: "chars", the sorted distinct characters of the text, or "bytes", the 256 byte values (any file,
            any prompt).
        val_tokens: a validation predicts the first this many tokens of the validation split (all of them when the
            split is shorter; null: always all), so its time is bounded whatever the corpus size. "auto": 250,000,
            fewer for a vocabulary over 1,000 (250,000 x 1,000 / vocab_size), whose output layer costs more a token.
        cache_dir: where prepared corpora are kept, one folder per text and tokenizer.
    """

    def __init__(
        self,
        path: str | None = None,
        block_size: int = 64,
        batch_size: int = 32,
        train_fraction: float = 0.9,
        tokenizer: Literal["chars", "bytes"] = "chars",
        val_tokens: int | Literal["auto"] | None = "auto",
        cache_dir: str = "data/prepared",
    ):
        super().__init__()
        if block_size < 1 or batch_size < 1:
            raise ValueError(f"--data.block_size {block_size} and --data.batch_size {batch_size} must both be >= 1")
        if not 0 < train_fraction < 1:
            raise ValueError(f"--data.train_fraction {train_fraction} must be between 0 and 1, e.g. 0.9")
        if val_tokens not in (None, "auto") and val_tokens < 1:
            raise ValueError(
                f"--data.val_tokens {val_tokens} must be >= 1, auto, or null for the whole validation split"
            )
        if tokenizer not in TOKENIZERS:
            raise ValueError(f"--data.tokenizer {tokenizer!r} is not one of {', '.join(TOKENIZERS)}")
        if path is None:
            file = download(SHAKESPEARE_URL, Path(SHAKESPEARE_CACHE), SHAKESPEARE_SHA256)
        else:
            file = Path(path)
        self.path = path
        self.corpus = corpus.load(file, tokenizer, Path(cache_dir))
        tokens = self.corpus.tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed: int | None = None  # the training batches' seed, once they are drawn
        self.tokenizer = self.corpus.tokenizer
        n = int(train_fraction * len(tokens))
        self.train_data, self.val_data = tokens[:n], tokens[n:]
        for split, part in (("training", self.train_data), ("validation", self.val_data)):
            if len(part) < block_size + 1:
                raise ValueError(
                    f"{file}: the {split} split has {len(part)} {self.tokenizer.unit}, fewer than one window of "
                    f"block_size + 1 = {block_size + 1}: use a longer text or a smaller --data.block_size"
                )
        if val_tokens == "auto":
            val_tokens = min(250_000, 250_000_000 // self.vocab_size)
        # the tokens a validation reads: its inputs and the val_tokens targets they predict
        self.val_window = self.val_data if val_tokens is None else self.val_data[: val_tokens + 1]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def train_dataloader(self) -> RandomWindows:
        # torch.initial_seed() is the run's seed (seed_everything sets it); a resumed run's trainer is at its step.
        # Every rank has the same seed (LightningCLI seeds them all alike) and takes its own share of each batch
        trainer = self.trainer
        start = trainer.global_step * trainer.accumulate_grad_batches if trainer else 0
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        self.seed = torch.initial_seed()
        return RandomWindows(self.train_data, self.block_size, self.batch_size, self.seed, start, rank, world_size)

    def val_dataloader(self) -> DataLoader:
        world_size = self.trainer.world_size if self.trainer else 1
        windows = ValidationWindows(self.val_window, self.block_size, world_size)
        return DataLoader(windows, batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        # the 90/10 convention keeps no third split: `test` reports the validation split as test/loss
        return self.val_dataloader()

    def state_dict(self) -> dict:
        # the tokenizer travels in every checkpoint, so a checkpoint alone is enough to generate text; the batch
        # stream's settings and its text, so a run resumed with other ones can say so
        stream = {"block_size": self.block_size, "batch_size": self.batch_size, "seed": self.seed}
        text = {"tokens": self.corpus.meta["tokens"], "text": self.text_digest}
        meta = self.corpus.meta  # what an export's model card says the model was trained on
        name = Path(self.path).resolve().name if self.path else Path(SHAKESPEARE_CACHE).name
        source = {"name": name, "bytes": meta["bytes"], "sha256": meta["sha256"]}
        return self.tokenizer.state() | {"stream": stream | text, "source": source}

    @property
    def text_digest(self) -> str:
        """What tells one text from another of the same vocabulary: its length and how often each token occurs."""
        meta = self.corpus.meta
        return hashlib.sha256(json.dumps([meta["tokens"], meta["counts"]]).encode()).hexdigest()[:16]

    def load_state_dict(self, state: dict) -> None:
        try:
            theirs = tokenizer_from_state(state)
        except ValueError as e:
            raise ValueError(f"the checkpoint is not charlm's ({e}): pass a .ckpt file charlm saved") from None
        if theirs.name != self.tokenizer.name:
            raise ValueError(
                f"the checkpoint was trained with --data.tokenizer {theirs.name}, this run uses "
                f"{self.tokenizer.name}: pass --data.tokenizer {theirs.name}"
            )
        if theirs.state() != self.tokenizer.state():
            raise ValueError(
                f"the checkpoint's vocabulary ({theirs.vocab_size} characters) differs from this text's "
                f"({self.vocab_size}): resume with the --data.path the checkpoint was trained on"
            )


def summary(data: CharDataModule) -> None:
    """A first look at a corpus: its size, alphabet, most frequent characters, opening and split.

    It prepares the corpus (once), so a big one can be prepared ahead of training.

    Args:
        data: the corpus and its split, as fit takes them (--data.path, --data.tokenizer, ...).
    """
    dm = data
    meta, tokenizer = dm.corpus.meta, dm.tokenizer
    if tokenizer.name == "chars":
        symbols = [visible(c) for c in tokenizer.chars]
        opening = tokenizer.decode(dm.train_data[:500].tolist())
    else:
        symbols = [visible(chr(b)) if b < 128 else f"\\x{b:02x}" for b in range(256)]
        opening = tokenizer.decode(dm.train_data[:2000].tolist())[:500]
    present = [s for s, count in zip(symbols, meta["counts"]) if count]
    alphabet = "".join(present[:300]) + (f" … and {len(present) - 300:,} more" if len(present) > 300 else "")
    source = Path(meta["sources"][0]["path"]) if len(meta["sources"]) == 1 else f"{len(meta['sources'])} .txt files"
    facts = Table(box=None, show_header=False, title="corpus", title_justify="left")
    facts.add_row("source", str(source))
    facts.add_row("text", f"{meta['characters']:,} characters, {meta['bytes']:,} bytes")
    facts.add_row("tokenizer", f"{tokenizer.name}: a vocabulary of {tokenizer.vocab_size}, stored as {meta['dtype']}")
    facts.add_row("alphabet", Text(alphabet))
    facts.add_row("split", f"{len(dm.train_data):,} training and {len(dm.val_data):,} validation tokens")
    facts.add_row("validation", f"each predicts the first {len(dm.val_window) - 1:,} validation tokens")
    size = (dm.corpus.folder / "tokens.bin").stat().st_size / 1e6
    facts.add_row("prepared", f"{dm.corpus.folder}/ (tokens.bin {size:,.1f} MB, meta.json)")
    frequent = Table("", "count", "share", title="most frequent", title_justify="left", box=None)
    total = sum(meta["counts"])
    for count, symbol in sorted(zip(meta["counts"], symbols), reverse=True)[:10]:
        frequent.add_row(symbol, f"{count:,}", f"{count / total:.2%}")
    console = Console()
    console.print(facts, frequent, Panel(Text(opening), title="the first 500 characters", title_align="left"))
