import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# CI keeps the corpus beside the checkout; a newcomer has the copy that `python -m charlm fit` downloaded
CORPUS_CANDIDATES = [ROOT.parent / "shared/data/tinyshakespeare/input.txt", ROOT / "data/tinyshakespeare/input.txt"]


@pytest.fixture(scope="session")
def corpus() -> Path:
    """The real tiny-shakespeare file, never fetched from the internet by a test."""
    for path in CORPUS_CANDIDATES:
        if path.is_file():
            return path
    message = f"tiny-shakespeare not found at {[str(p) for p in CORPUS_CANDIDATES]}: run `python -m charlm fit` once"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def tiny_text(tmp_path) -> Path:
    """A short repetitive text that a small model can learn almost perfectly."""
    path = tmp_path / "tiny.txt"
    path.write_text("hello world, hello charlm.\n" * 40)
    return path
