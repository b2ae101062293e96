"""Text to tensors: the corpus download, the character tokenizer, training and validation batches, the DataModule.

Data flows one way: text file -> CharTokenizer -> token tensor -> 90/10 split -> batches.
Training draws random windows; validation walks the whole validation split in fixed windows, so the validation
loss is an exact number, the same every time for the same weights.
With several processes (DDP), each rank takes its own share of every training batch and of the validation windows.
"""

import hashlib
import math
import os
import urllib.error
import urllib.request
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from charlm.models import IGNORE_INDEX

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_CACHE = "data/tinyshakespeare/input.txt"  # relative to the working directory


def download(url: str, dest: Path, sha256: str) -> Path:
    """Fetch `url` into `dest` unless it is already there; the file only gets its name once its checksum matches."""
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            f.write(response.read())
    except (urllib.error.URLError, OSError) as e:
        tmp.unlink(missing_ok=True)
        raise OSError(f"could not download {url} ({e}): check the network, or pass --data.path FILE") from None
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    if digest != sha256:
        tmp.unlink()
        raise OSError(f"{url} has sha256 {digest}, expected {sha256}: the download was deleted, try again later")
    os.replace(tmp, dest)
    return dest


class CharTokenizer:
    """Maps each distinct character of a corpus to an id: the vocabulary is the sorted set of its characters."""

    def __init__(self, chars: str):
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        return [self.stoi[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)


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
        data: torch.Tensor,
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
            windows = self.data[starts + self.offsets]  # (B, T + 1), gathered in one indexing op
            yield windows[:, :-1], windows[:, 1:]


def validation_windows(data: torch.Tensor, block_size: int, multiple: int = 1) -> TensorDataset:
    """Consecutive non-overlapping windows that predict every token of `data` after the first exactly once.

    The last window is padded, and whole padding windows are added up to a multiple of `multiple` windows; padded
    targets are IGNORE_INDEX, so they add nothing to the loss. A multiple of the world size is what DDP needs:
    Lightning's DistributedSampler then splits the windows evenly instead of repeating some to even the shares.
    """
    n = math.ceil(math.ceil((len(data) - 1) / block_size) / multiple) * multiple
    x = torch.zeros(n * block_size, dtype=torch.long)
    y = torch.full((n * block_size,), IGNORE_INDEX, dtype=torch.long)
    x[: len(data) - 1] = data[:-1]
    y[: len(data) - 1] = data[1:]
    return TensorDataset(x.view(n, block_size), y.view(n, block_size))


class CharDataModule(L.LightningDataModule):
    """A character-level corpus split 90/10 into training and validation.

    Args:
        path: a UTF-8 text file to train on; by default tiny-shakespeare, downloaded on first use into
            data/tinyshakespeare/ under the working directory.
        block_size: context length in characters, the T of every (B, T) batch.
        batch_size: windows per batch, for training and validation.
        train_fraction: the leading part of the text used for training; the rest is validation.
    """

    def __init__(
        self,
        path: str | None = None,
        block_size: int = 64,
        batch_size: int = 32,
        train_fraction: float = 0.9,
    ):
        super().__init__()
        if block_size < 1 or batch_size < 1:
            raise ValueError(f"--data.block_size {block_size} and --data.batch_size {batch_size} must both be >= 1")
        if path is None:
            file = download(SHAKESPEARE_URL, Path(SHAKESPEARE_CACHE), SHAKESPEARE_SHA256)
        else:
            file = Path(path)
        text = read_text(file)
        if not text:
            raise ValueError(f"--data.path {file} is empty: pass a text file with some content")
        self.block_size = block_size
        self.batch_size = batch_size
        self.tokenizer = CharTokenizer.from_text(text)
        data = torch.tensor(self.tokenizer.encode(text), dtype=torch.long)
        n = int(train_fraction * len(data))
        self.train_data, self.val_data = data[:n], data[n:]
        for split, part in (("training", self.train_data), ("validation", self.val_data)):
            if len(part) < block_size + 1:
                raise ValueError(
                    f"{file}: the {split} split has {len(part)} characters, fewer than one window of "
                    f"block_size + 1 = {block_size + 1}: use a longer text or a smaller --data.block_size"
                )

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def train_dataloader(self) -> RandomWindows:
        # torch.initial_seed() is the run's seed (seed_everything sets it); a resumed run's trainer is at its step.
        # Every rank has the same seed (LightningCLI seeds them all alike) and takes its own share of each batch
        trainer = self.trainer
        start = trainer.global_step * trainer.accumulate_grad_batches if trainer else 0
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        seed = torch.initial_seed()
        return RandomWindows(self.train_data, self.block_size, self.batch_size, seed, start, rank, world_size)

    def val_dataloader(self) -> DataLoader:
        world_size = self.trainer.world_size if self.trainer else 1
        return DataLoader(validation_windows(self.val_data, self.block_size, world_size), batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        # the 90/10 convention keeps no third split: `test` reports the validation split as test/loss
        return self.val_dataloader()

    def state_dict(self) -> dict:
        # the vocabulary travels in every checkpoint, so a checkpoint alone is enough to generate text
        return {"chars": self.tokenizer.chars}

    def load_state_dict(self, state: dict) -> None:
        if state["chars"] != self.tokenizer.chars:
            raise ValueError(
                f"the checkpoint's vocabulary ({len(state['chars'])} characters) differs from this text's "
                f"({self.vocab_size}): resume with the --data.path the checkpoint was trained on"
            )


def read_text(file: Path, flag: str = "--data.path") -> str:
    """Read a UTF-8 text file, with one-line errors that name the flag it came from and what is wrong with it."""
    if not file.exists():
        raise FileNotFoundError(f"{flag} {file} does not exist: pass a UTF-8 text file")
    if file.is_dir():
        raise IsADirectoryError(f"{flag} {file} is a directory: pass a UTF-8 text file")
    raw = file.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag} {file} is not UTF-8 (byte offset {e.start}): convert it to UTF-8") from None
