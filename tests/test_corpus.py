"""Prepared corpora (charlm.corpus), the byte tokenizer, folders and bounded validation: real files and processes."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import scalars, tiny

from charlm.__main__ import main
from charlm.data import CharDataModule
from charlm.models import GPT
from charlm.tokenizers import ByteTokenizer
from charlm.training import CharLM

PREPARE = "from charlm.data import CharDataModule; CharDataModule({path!r}, tokenizer={tokenizer!r})"


def prepared(cwd: Path) -> list[Path]:
    return sorted((cwd / "data/prepared").glob("*/tokens.bin"))


def ascii_text(path: Path, megabytes: float) -> str:
    line = "the quick brown fox jumps over the lazy dog, THE END!\n"
    text = line * int(megabytes * 1e6 / len(line))
    path.write_text(text)
    return text


def test_a_prepared_corpus_is_reused_and_not_encoded_again(tiny_text, tmp_path, capsys):
    first = CharDataModule(str(tiny_text))
    assert "charlm: preparing" in capsys.readouterr().err
    [tokens] = prepared(tmp_path)
    before = tokens.stat()
    second = CharDataModule(str(tiny_text))
    assert capsys.readouterr().err == ""
    after = tokens.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert np.array_equal(first.train_data, second.train_data)
    text = tiny_text.read_text()
    assert first.tokenizer.decode(np.concatenate([first.train_data, first.val_data]).tolist()) == text


def test_a_changed_text_is_prepared_again(tiny_text, tmp_path, capsys):
    assert CharDataModule(str(tiny_text)).vocab_size == 14
    with open(tiny_text, "a") as f:
        f.write("Zebra!\n")
    dm = CharDataModule(str(tiny_text))
    assert "charlm: preparing" in capsys.readouterr().err
    assert dm.vocab_size == 17
    assert dm.tokenizer.decode(dm.val_data[-7:].tolist()) == "Zebra!\n"
    assert len(prepared(tmp_path)) == 1  # the same folder, prepared again


def test_a_token_file_changed_after_preparation_is_prepared_again(tiny_text, tmp_path, capsys):
    dm = CharDataModule(str(tiny_text))
    [tokens] = prepared(tmp_path)
    del dm
    with open(tokens, "r+b") as f:
        f.write(bytes([200]))  # an id the 14-character vocabulary does not have
    capsys.readouterr()
    dm = CharDataModule(str(tiny_text))
    assert "charlm: preparing" in capsys.readouterr().err
    assert int(dm.train_data.max()) < 14


def test_two_runs_preparing_the_same_text_at_once_share_one_preparation(tmp_path):
    text = ascii_text(tmp_path / "big.txt", 30)
    command = [sys.executable, "-c", PREPARE.format(path=str(tmp_path / "big.txt"), tokenizer="chars")]
    runs = [subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [run.communicate(timeout=300)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], errors
    assert sum("charlm: preparing" in e for e in errors) == 1, errors
    [tokens] = prepared(tmp_path)
    assert sorted(p.name for p in tokens.parent.iterdir()) == [".charlm-lock", "meta.json", "tokens.bin"]
    chars = json.loads((tokens.parent / "meta.json").read_text())["chars"]
    ids = bytes.maketrans(chars.encode(), bytes(range(len(chars))))
    assert tokens.read_bytes() == text.encode().translate(ids)


def test_a_killed_preparation_is_never_used_and_the_next_run_prepares_again(tmp_path):
    text = ascii_text(tmp_path / "big.txt", 60)
    command = [sys.executable, "-c", PREPARE.format(path=str(tmp_path / "big.txt"), tokenizer="bytes")]
    run = subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "data/prepared").glob("*/.saving-*")):
        assert run.poll() is None and time.monotonic() < deadline, "the preparation ended before it could be killed"
        time.sleep(0.001)
    run.send_signal(signal.SIGKILL)
    run.wait()
    [folder] = (tmp_path / "data/prepared").iterdir()
    assert not (folder / "meta.json").exists()
    dm = CharDataModule(str(tmp_path / "big.txt"), tokenizer="bytes")
    assert sorted(p.name for p in folder.iterdir()) == [".charlm-lock", "meta.json", "tokens.bin"]
    assert dm.train_data.tobytes() + dm.val_data.tobytes() == text.encode()


def test_byte_tokenizer_round_trip_and_streamed_characters():
    text = "héllo → 世界 🙂\n"
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(text)
    assert ids == list(text.encode("utf-8")) and tokenizer.decode(ids) == text
    decoder = tokenizer.decoder()
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all(p == "" or p in text for p in pieces)  # nothing half-made: each piece is whole characters
    assert pieces.count("") == len(ids) - len(text) + 1  # the bytes that did not complete a character, and flush
    bad = tokenizer.decoder()
    assert [bad.push(i) for i in [0xFF, 0x41, 0xE4, 0xB8]] + [bad.flush()] == ["\\xff", "A", "", "", "\\xe4\\xb8"]


def run_main(*args) -> int:
    """`python -m charlm ARGS` in this process (the imports are paid once); its exit status."""
    try:
        main(list(args))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


def test_byte_tokenizer_fits_generates_validates_and_draws(tmp_path, capsys):
    (tmp_path / "text.txt").write_text("Grüße aus Köln, 世界 → ünïcödé.\n" * 60)
    flags = [*tiny(tmp_path / "text.txt"), "--data.tokenizer", "bytes", "--data.block_size", "16"]
    assert run_main("fit", *flags) == 0
    ckpt = torch.load(tmp_path / "checkpoints/gpt-cpu-text/version_0/last.ckpt", weights_only=True)
    stream = ckpt["CharDataModule"]["stream"]  # the text it was trained on: its length and a digest of its counts
    assert stream.pop("tokens") == len((tmp_path / "text.txt").read_bytes()) and len(stream.pop("text")) == 16
    text = (tmp_path / "text.txt").read_bytes()
    assert ckpt["CharDataModule"] == {
        "tokenizer": "bytes",
        "stream": {"block_size": 16, "batch_size": 64, "seed": 1337},
        "source": {"name": "text.txt", "bytes": len(text), "sha256": hashlib.sha256(text).hexdigest()},
    }
    assert ckpt["state_dict"]["net.wte.weight"].shape[0] == 256
    capsys.readouterr()
    assert run_main("generate", "--ckpt_path", "last", "--prompt", "Grüße", "--max_new_tokens", "300") == 0
    generated = capsys.readouterr().out
    assert generated.startswith("Grüße") and "\ufffd" not in generated
    assert run_main("validate", *flags, "--ckpt_path", "last") == 0
    assert run_main("attention", "--ckpt_path", "last", "--prompt", "世界 → ü", "--out", "a.png") == 0
    assert (tmp_path / "a.png").stat().st_size > 0
    resume = [*tiny(tmp_path / "text.txt"), "--data.block_size", "16", "--ckpt_path", "last"]
    with pytest.raises(SystemExit, match="trained with --data.tokenizer bytes, the config or flags give chars"):
        main(["fit", *resume, "--data.tokenizer", "chars"])


def test_a_folder_is_its_txt_files_in_path_order_a_newline_between(tmp_path):
    (tmp_path / "books/b").mkdir(parents=True)
    (tmp_path / "books/b/2.txt").write_text("second\n")
    (tmp_path / "books/a.txt").write_text("first, no newline")
    (tmp_path / "books/b/3.txt").write_text("third")
    (tmp_path / "books/notes.md").write_text("not text")
    dm = CharDataModule(str(tmp_path / "books"), block_size=4, train_fraction=0.5)
    all_tokens = np.concatenate([dm.train_data, dm.val_data]).tolist()
    assert dm.tokenizer.decode(all_tokens) == "first, no newline\nsecond\nthird"
    (tmp_path / "books/b/4.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"books/b/4.txt is not UTF-8 \(byte offset 3\)"):
        CharDataModule(str(tmp_path / "books"), block_size=4)


def validate(dm: CharDataModule, net: GPT, tmp_path: Path) -> dict:
    options = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer = L.Trainer(accelerator="cpu", **options)
    [metrics] = trainer.validate(CharLM(net), datamodule=dm, verbose=False)
    return metrics


def test_validation_is_bounded_by_val_tokens_and_exact(tmp_path):
    ascii_text(tmp_path / "text.txt", 0.05)
    torch.manual_seed(0)
    capped = CharDataModule(str(tmp_path / "text.txt"), block_size=16, val_tokens=1000)
    net = GPT(vocab_size=capped.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16)
    first, second = validate(capped, net, tmp_path), validate(capped, net, tmp_path)
    assert first == second and first["val/tokens"] == 1000
    whole = CharDataModule(str(tmp_path / "text.txt"), block_size=16, val_tokens=None)
    assert validate(whole, net, tmp_path)["val/tokens"] == len(whole.val_data) - 1 > 1000


def test_fit_logs_how_many_tokens_a_validation_covered(tiny_text, tmp_path):
    assert run_main("fit", *tiny(tiny_text), "--data.val_tokens", "50", "--data.block_size", "8") == 0
    assert {value for _, value in scalars(tmp_path / "logs/gpt-cpu-tiny/version_0")["val/tokens"]} == {50}


def test_data_command_shows_the_corpus_at_a_glance(tmp_path, capsys):
    (tmp_path / "text.txt").write_text("To be, or not to be:\tthat is the question.\n" * 30)
    assert run_main("data", "--data.path", "text.txt") == 0
    out = capsys.readouterr().out
    assert "1,290 characters" in out and "1,290 bytes" in out
    assert "vocabulary of 19" in out
    assert "\\n" in out and "\\t" in out  # the invisible characters, made visible
    assert "To be, or not to be:" in out
    assert "1,161" in out and "129" in out  # training and validation tokens
    [tokens] = prepared(tmp_path)
    assert tokens.parent.name in out
    assert run_main("data", "--data.path", "text.txt") == 0
    again = capsys.readouterr()
    assert again.out == out and "preparing" not in again.err


def test_a_vocabulary_beyond_uint16_is_refused_with_the_byte_tokenizer_as_the_fix(tmp_path):
    (tmp_path / "wide.txt").write_text("".join(chr(0x10000 + i) for i in range(70_000)) * 2)
    with pytest.raises(ValueError, match="has 70,000 distinct characters.*pass --data.tokenizer bytes"):
        CharDataModule(str(tmp_path / "wide.txt"))
    assert not prepared(tmp_path)
    assert CharDataModule(str(tmp_path / "wide.txt"), tokenizer="bytes").vocab_size == 256


@pytest.mark.parametrize("path, message", [("fifo", "is a FIFO, not a regular file"), ("/dev/zero", "is a device")])
def test_non_regular_files_are_refused_at_once(tmp_path, path, message):
    if path == "fifo":
        os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ValueError, match=message):
        CharDataModule(path)


def test_a_fifo_inside_a_folder_is_named(tmp_path):
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts/a.txt").write_text("hello " * 100)
    os.mkfifo(tmp_path / "texts/b.txt")
    with pytest.raises(ValueError, match="texts/b.txt is a FIFO, not a regular file"):
        CharDataModule(str(tmp_path / "texts"))


def test_a_cache_folder_that_cannot_be_written_is_one_line(tiny_text, tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(OSError, match="--data.cache_dir .*a_file/cache: cannot write the prepared corpus there"):
        CharDataModule(str(tiny_text), cache_dir=str(tmp_path / "a_file/cache"))


def test_a_text_that_changes_while_it_is_prepared_is_refused_and_nothing_is_kept(tmp_path):
    ascii_text(tmp_path / "growing.txt", 20)
    done = threading.Event()

    def append():
        with open(tmp_path / "growing.txt", "a") as f:
            while not done.is_set():
                f.write("more\n")
                f.flush()
                time.sleep(0.001)

    writer = threading.Thread(target=append)
    writer.start()
    try:
        with pytest.raises(ValueError, match="growing.txt changed while it was being prepared"):
            CharDataModule(str(tmp_path / "growing.txt"))
    finally:
        done.set()
        writer.join()
    [folder] = (tmp_path / "data/prepared").iterdir()
    assert [p.name for p in folder.iterdir()] == [".charlm-lock"]
    assert len(CharDataModule(str(tmp_path / "growing.txt")).train_data) > 0  # still now: prepared


def test_a_full_disk_while_preparing_is_one_line_and_leaves_no_partial_files(tmp_path, small_disk):
    ascii_text(tmp_path / "big.txt", 3)
    with pytest.raises(OSError) as error:
        CharDataModule(str(tmp_path / "big.txt"), cache_dir=str(small_disk))
    assert "the disk is full: preparing" in str(error.value) and "\n" not in str(error.value)
    [folder] = small_disk.iterdir()
    assert [p.name for p in folder.iterdir()] == [".charlm-lock"]
    assert len(CharDataModule(str(tmp_path / "big.txt"), cache_dir=str(tmp_path / "roomy")).train_data) == 2_699_973


@pytest.mark.parametrize("name", ["meta.json", "tokens.bin"])
@pytest.mark.parametrize("kind", ["a FIFO", "a symbolic link"])
def test_a_cache_file_that_is_not_a_regular_file_is_refused_at_once(tiny_text, tmp_path, name, kind):
    CharDataModule(str(tiny_text))
    [file] = (tmp_path / "data/prepared").glob(f"*/{name}")
    file.unlink()
    if kind == "a FIFO":  # a read of either never ends
        os.mkfifo(file)
    else:
        file.symlink_to("/dev/zero")
    with pytest.raises(ValueError, match=f"{name} is {kind}, not a file charlm prepared: remove it"):
        CharDataModule(str(tiny_text))


def test_a_cache_whose_vocabulary_was_swapped_is_prepared_again(tiny_text, tmp_path, capsys):
    first = CharDataModule(str(tiny_text))
    [meta_file] = (tmp_path / "data/prepared").glob("*/meta.json")
    meta = json.loads(meta_file.read_text())
    meta["chars"] = meta["chars"][:-1] + chr(ord(meta["chars"][-1]) + 1)  # the same length, sorted, one id changed
    meta_file.write_text(json.dumps(meta))
    capsys.readouterr()
    again = CharDataModule(str(tiny_text))
    assert "preparing" in capsys.readouterr().err
    assert again.tokenizer.chars == first.tokenizer.chars


def test_a_subfolder_that_cannot_be_read_or_is_a_link_is_an_error_naming_it(tmp_path):
    for name in ("texts/a", "texts/b", "elsewhere"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "part.txt").write_text("hello world\n" * 50)
    (tmp_path / "texts/b").chmod(0)
    # root reads any folder: without these two capabilities it obeys the permissions, as a user does
    command = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", sys.executable, "-m", "charlm", "data"]
    result = subprocess.run([*command, "--data.path", "texts"], cwd=tmp_path, capture_output=True, text=True)
    (tmp_path / "texts/b").chmod(0o755)
    assert result.returncode == 1 and result.stderr.strip() == (
        "charlm: error: --data.path: texts/b cannot be read (Permission denied): make it readable, or move it out"
    )
    (tmp_path / "texts/b").rename(tmp_path / "b")
    (tmp_path / "texts/b").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="texts/b is a link to a folder, which charlm does not follow"):
        CharDataModule(str(tmp_path / "texts"))
