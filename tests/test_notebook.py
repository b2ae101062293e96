"""notebooks/tour.ipynb runs top to bottom at its small sizes (CHARLM_TOUR_SMALL=1): a cell that breaks fails here."""

import re
import tempfile
from pathlib import Path

import nbformat
import pytest
from conftest import ROOT
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError


def test_the_tour_runs_top_to_bottom_and_computes_what_it_claims(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("CHARLM_TOUR_SMALL", "1")
    monkeypatch.setenv("CHARLM_TOUR_TEXT", str(corpus))  # no download: the text the tests make
    notebook = nbformat.read(ROOT / "notebooks/tour.ipynb", as_version=4)
    client = NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": tmp_path}})
    tours = set(Path(tempfile.gettempdir()).glob("charlm-tour-*"))  # other tours' (another test process's)
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    printed = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert "layer 1, head 1 from q and k by hand equals the model's: True" in printed
    without, with_rope = map(
        float, re.search(r"without positions: (\S+); with rotary positions: (\S+)", printed).groups()
    )
    assert without < 1e-5 < with_rope  # shuffled characters: the same output without positions, not with them
    assert "rows 1-3 unchanged: [True, True, True]" in printed
    assert "the same text as charlm generate: True" in printed
    assert re.search(r"the same \d+ first characters with the cache and without: True", printed)
    without_cache, with_cache = (
        int(n.replace(",", ""))
        for n in re.search(r"positions computed: ([\d,]+) without the cache, ([\d,]+) with it", printed).groups()
    )
    assert with_cache < without_cache
    # the tour leaves its checkpoint where section 10 says, and removes its working folder
    assert [p.name for p in tmp_path.iterdir()] == ["tour.ckpt"]
    assert f"python -m charlm serve --ckpt_path {tmp_path / 'tour.ckpt'}" in printed
    assert not (set(Path(tempfile.gettempdir()).glob("charlm-tour-*")) - tours)


def test_a_tour_text_that_is_no_file_stops_the_tour_naming_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("CHARLM_TOUR_TEXT", str(tmp_path))  # a folder
    notebook = nbformat.read(ROOT / "notebooks/tour.ipynb", as_version=4)
    client = NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": tmp_path}})
    with pytest.raises(CellExecutionError, match=f"CHARLM_TOUR_TEXT={re.escape(str(tmp_path))} is no text file"):
        client.execute()
