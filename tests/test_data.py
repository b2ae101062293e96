import hashlib
import http.server
import threading
from functools import partial

import numpy as np
import pytest
import torch

from charlm.data import CharDataModule, RandomWindows, ValidationWindows, download
from charlm.models import IGNORE_INDEX


def windows(data, block_size, multiple=1) -> tuple[torch.Tensor, torch.Tensor]:
    """All validation windows, stacked as (N, T) inputs and targets."""
    x, y = zip(*ValidationWindows(data, block_size, multiple))
    return torch.stack(x), torch.stack(y)


def test_tokenizer_round_trip_and_vocab_of_the_real_corpus(shakespeare):
    text = shakespeare.read_text()
    tokenizer = CharDataModule(str(shakespeare)).tokenizer
    assert tokenizer.chars == "".join(sorted(set(text)))
    assert tokenizer.vocab_size == 65
    assert tokenizer.chars[0] == "\n" and tokenizer.chars[1] == " "  # sorted
    sample = text[:2000]
    assert tokenizer.decode(tokenizer.encode(sample)) == sample


def test_split_sizes_match_nanogpt(shakespeare):
    dm = CharDataModule(path=str(shakespeare))
    assert (len(dm.train_data), len(dm.val_data)) == (1_003_854, 111_540)
    assert dm.vocab_size == 65


def test_train_batches_are_windows_with_targets_shifted_by_one(corpus):
    dm = CharDataModule(path=str(corpus), block_size=16, batch_size=5)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (5, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])
    text = corpus.read_text()
    for row_x, row_y in zip(x, y, strict=True):
        window = dm.tokenizer.decode(row_x.tolist()) + dm.tokenizer.decode(row_y[-1:].tolist())
        assert window in text


def test_train_batches_depend_on_seed_and_batch_number_only():
    data = np.arange(1000)
    first = list(RandomWindows(data, block_size=8, batch_size=4, seed=7))
    resumed = list(RandomWindows(data, block_size=8, batch_size=4, seed=7, start=3))
    other_seed = next(iter(RandomWindows(data, block_size=8, batch_size=4, seed=8)))
    assert len(first) == 1000 // 32
    assert torch.equal(first[3][0], resumed[0][0])
    assert not torch.equal(first[0][0], other_seed[0])


def test_ranks_share_each_batch_of_the_single_process_run():
    data = np.arange(1000)
    whole = next(iter(RandomWindows(data, block_size=8, batch_size=8, seed=7)))[0]
    shares = [next(iter(RandomWindows(data, 8, 4, seed=7, rank=r, world_size=2)))[0] for r in (0, 1)]
    assert torch.equal(torch.cat(shares), whole)


def test_validation_windows_pad_to_a_multiple_with_windows_that_count_for_nothing():
    data = np.arange(1, 24)  # 3 windows of 8, padded to 4 for e.g. two ranks
    x, y = windows(data, block_size=8, multiple=2)
    assert x.shape == (4, 8)
    assert torch.equal(y[y != IGNORE_INDEX], torch.from_numpy(data[1:]))


def test_validation_windows_predict_every_token_exactly_once():
    data = np.arange(1, 24)  # 23 tokens: 22 targets, 3 windows of 8 with the last padded
    x, y = windows(data, block_size=8)
    assert x.shape == y.shape == (3, 8)
    targets = y[y != IGNORE_INDEX]
    assert torch.equal(targets, torch.from_numpy(data[1:]))
    assert torch.equal(x.flatten()[:22], torch.from_numpy(data[:-1]))


@pytest.fixture
def http_server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving files from a folder."""
    served = tmp_path / "served"
    served.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_fetches_and_verifies_the_corpus(http_server, corpus, tmp_path):
    served, url = http_server
    (served / "input.txt").write_bytes(corpus.read_bytes())
    sha = hashlib.sha256(corpus.read_bytes()).hexdigest()
    dest = tmp_path / "cache/input.txt"
    assert download(f"{url}/input.txt", dest, sha) == dest
    assert dest.read_bytes() == corpus.read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == ["input.txt"]


def test_download_refuses_a_corrupted_file_and_keeps_nothing(http_server, corpus, tmp_path):
    served, url = http_server
    corrupted = bytearray(corpus.read_bytes())
    corrupted[1000] ^= 1
    (served / "input.txt").write_bytes(bytes(corrupted))
    sha = hashlib.sha256(corpus.read_bytes()).hexdigest()
    dest = tmp_path / "cache/input.txt"
    with pytest.raises(OSError, match="sha256"):
        download(f"{url}/input.txt", dest, sha)
    assert not dest.parent.exists()


def test_download_failure_says_to_pass_a_local_file(http_server, tmp_path):
    _, url = http_server
    dest = tmp_path / "data/input.txt"
    with pytest.raises(OSError, match=f"put a copy of the file at {dest}, or pass --data.path FILE"):
        download(f"{url}/missing.txt", dest, "0" * 64)
    assert not dest.parent.exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        ("dir", "is a folder with no .txt file in it"),
        (b"", "is empty"),
        (b"ab\xffcd", "not UTF-8 \\(byte offset 2\\)"),
    ],
)
def test_bad_data_paths_are_refused_with_the_reason(tmp_path, content, message):
    path = tmp_path / "text.txt"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises((OSError, ValueError), match=message):
        CharDataModule(path=str(path))


def test_text_too_short_for_one_window_is_refused(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("x" * 100)
    with pytest.raises(ValueError, match="fewer than one window"):
        CharDataModule(path=str(path), block_size=64)
