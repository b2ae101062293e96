import os
import random
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
# CI keeps the corpus beside the checkout; a newcomer has the copy that `python -m charlm fit` downloaded
CORPUS_CANDIDATES = [ROOT.parent / "shared/data/tinyshakespeare/input.txt", ROOT / "data/tinyshakespeare/input.txt"]
# two test processes share two cores, with the runs they start: a thread each, where two each would spin-wait on
# one another (a test of tiny forward passes took 40 s beside the others, 1 s alone). Tests of threads set their own.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    """The real tiny-shakespeare file, for the tests of its own numbers; never fetched from the internet by a test."""
    for path in CORPUS_CANDIDATES:
        if path.is_file():
            return path
    message = (
        f"tiny-shakespeare not found at {[str(p) for p in CORPUS_CANDIDATES]}: copy it to {CORPUS_CANDIDATES[1]} "
        "(python -m charlm fit downloads it to data/tinyshakespeare/input.txt under the folder it runs in)"
    )
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


SPEAKERS = ["ROMEO", "JULIET", "KING HENRY VI", "GREMIO", "BAPTISTA", "First Citizen", "QUEEN MARGARET"]
WORDS = (
    "the and to of my that you is in not with me it for be his your this but he have as thou so him will what "
    "thy all her do shall by no we are sir good lord o now if our more then love king come well let from here "
    "quick jest zeal vex judge fixed brazen majesty whose eyes pray yet hath heaven death night away"
).split()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A Shakespeare-like text made on the spot (about 100 KB, the 65 characters of tiny-shakespeare), so that the
    tests need no download and no copy of the real file."""
    rng = random.Random(0)
    speeches = ["3 KING HENRY VI:\nA $ for thy & thoughts, sir! X marks it.\n"]
    while sum(map(len, speeches)) < 100_000:
        lines = []
        for _ in range(rng.randint(1, 4)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 10))]
            words[0] = words[0].capitalize()
            lines.append(" ".join(words) + rng.choice([",", ".", ";", "?", "!", ":", "'", "-", "."]))
        speeches.append(f"{rng.choice(SPEAKERS)}:\n" + "\n".join(lines) + "\n")
    path = tmp_path_factory.mktemp("corpus") / "plays.txt"
    path.write_text("\n".join(speeches))
    return path


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """Every test runs in its own folder, so the prepared corpora (data/prepared/) never land in the checkout."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB filesystem (tmpfs), where the machine lets this process mount one."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def fill(folder: Path, leave: int) -> None:
    """Take the space left on the filesystem that holds folder, but for about `leave` bytes."""
    with open(folder / "filler", "wb", buffering=0) as f:  # unbuffered: nothing left to fail at close
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            f.truncate(max(0, f.tell() - leave))


@pytest.fixture
def tiny_text(tmp_path) -> Path:
    """A short repetitive text that a small model can learn almost perfectly."""
    path = tmp_path / "tiny.txt"
    path.write_text("hello world, hello charlm.\n" * 40)
    return path


def tiny(corpus, max_steps=4) -> list[str]:
    return [
        "--config", str(ROOT / "configs/gpt-cpu.yaml"),
        "--data.path", str(corpus),
        "--model.net.init_args.n_layer", "1",
        "--model.net.init_args.n_head", "2",
        "--model.net.init_args.n_embd", "32",
        "--model.warmup_steps", "2",
        "--data.block_size", "32",
        "--data.batch_size", "64",
        "--trainer.max_steps", str(max_steps),
        "--trainer.val_check_interval", "2",
        "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false",
        "--generation.max_new_tokens", "30",
    ]  # fmt: skip


def charlm(*args, cwd, env=None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "charlm", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in a TensorBoard log folder, read back with TensorBoard's own reader."""
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def wait_for_new_save(process, ckpts, timeout=120) -> None:
    """Wait until this process has replaced last.ckpt (or written the first one)."""
    last = ckpts / "last.ckpt"
    before = last.stat().st_mtime_ns if last.exists() else None
    deadline = time.monotonic() + timeout
    while not last.exists() or last.stat().st_mtime_ns == before:
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it saved"
        time.sleep(0.005)


CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]  # fmt: skip


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium, for the pages (the playground, an exported page)."""
    path = os.environ.get("CHARLM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        message = "no Chromium here: apt-get install chromium (or set CHARLM_CHROMIUM to one)"
        if os.environ.get("CHARLM_NEED_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@contextmanager
def open_page(browser, url: str):
    """The playground page at url (in a browser or one of its contexts), once it has listed its runs; no script
    error may happen while it is open."""
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(error))
    page.goto(url)
    page.wait_for_selector("#run option", state="attached")
    yield page
    page.close()
    assert not errors, errors


def shown_text(page) -> str:
    """The text a playground page shows: the prompt and what it generated."""
    return page.evaluate("Array.from(document.querySelectorAll('#output .tok'), s => s.textContent).join('')")
