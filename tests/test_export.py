"""Share a model: `charlm export` writes safetensors, config.json and a model card that load without charlm's
checkpoints, and every command that takes a checkpoint takes the folder."""

import contextlib
import functools
import hashlib
import http.server
import json
import subprocess
import sys
import threading

import pytest
import torch
from conftest import charlm, open_page, shown_text, tiny

from charlm import checkpoints, sampling
from charlm.__main__ import main
from charlm.serve.catalogue import Runs
from charlm.serve.stream import candidates
from charlm.settings import Sampling


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    """A tiny GPT trained for 4 steps, then resumed for 2 more, and its export."""
    cwd = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        patch.setattr(sys, "argv", ["charlm"])
        main(["fit", *tiny(corpus), "--generation.max_new_tokens", "0"])
        main(["fit", *tiny(corpus, max_steps=6), "--generation.max_new_tokens", "0", "--ckpt_path", "last"])
        main(["export", "--to", "shared"])
    return cwd


def test_an_export_loads_in_a_fresh_process_with_the_checkpoints_logits_and_text(run):
    ckpt = run / "checkpoints/gpt-cpu-plays/version_0/last.ckpt"
    assert sorted(p.name for p in (run / "shared").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    idx = torch.tensor([[0, 5, 9, 1, 3]])
    net, _ = checkpoints.load_net(ckpt)
    expected = net(idx)[0]
    probe = (
        "import json, sys, torch, charlm\n"
        "net, tokenizer = charlm.load('shared')\n"
        "print(json.dumps({'logits': net(torch.tensor([[0, 5, 9, 1, 3]]))[0].tolist(),"
        " 'torch': 'lightning' in sys.modules}))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=run, capture_output=True, text=True, check=True)
    loaded = json.loads(result.stdout)
    assert torch.allclose(torch.tensor(loaded["logits"]), expected, atol=1e-6)
    assert not loaded["torch"]  # loading needs torch and safetensors, not Lightning
    sample = ["--prompt", "KING", "--max_new_tokens", "80", "--seed", "7"]
    from_ckpt = charlm("generate", "--ckpt_path", str(ckpt), *sample, cwd=run)
    from_export = charlm("generate", "--ckpt_path", "shared", *sample, cwd=run)
    assert from_export.returncode == 0, from_export.stderr
    assert from_export.stdout == from_ckpt.stdout and len(from_ckpt.stdout) > 80


def test_loading_an_export_never_unpickles(run, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an export was unpickled")

    import pickle

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(module, name, refuse)
    net, tokenizer = checkpoints.load_net(run / "shared")
    assert tokenizer.decode(tokenizer.encode("KING")) == "KING" and not net.training


def test_the_model_card_says_what_the_model_was_trained_on_and_how(run, corpus):
    card = (run / "shared/README.md").read_text()
    config = json.loads((run / "shared/config.json").read_text())
    ckpt = torch.load(run / "checkpoints/gpt-cpu-plays/version_0/last.ckpt", weights_only=True)
    assert config["net"] == "GPT" and config["init_args"]["n_embd"] == 32
    assert config["tokenizer"]["chars"] == "".join(sorted(set(corpus.read_text())))
    assert hashlib.sha256(corpus.read_bytes()).hexdigest() in card
    assert f"` {corpus.name} `" in card
    assert f"{corpus.stat().st_size:,} bytes" in card
    assert "**Steps trained**: 6" in card
    loss = checkpoints.val_loss(ckpt)
    assert f"{loss:.4f} nats, {loss / 0.6931471805599453:.4f} bits per character" in card
    parameters = sum(p.numel() for p in checkpoints.load_net(run / "shared")[0].parameters())
    assert f"**Parameters**: {parameters:,}" in card
    first, resumed = config["trained"]["commands"]  # the run, then its resume
    assert first.startswith("python -m charlm fit --config ") and "--ckpt_path" not in first
    assert resumed.endswith("--ckpt_path last") and f"1. ` {first} `" in card
    assert 'charlm.load("shared")' in card


def test_fine_tuning_attention_and_the_playground_take_an_export(run, corpus, tmp_path):
    main(["fit", *tiny(corpus, max_steps=2), "--model.init_from", str(run / "shared"), "--trainer.logger", "false"])
    tuned = torch.load(next(tmp_path.glob("checkpoints/*/version_0/last.ckpt")), weights_only=True)
    assert tuned["hyper_parameters"]["init_from"] == str(run / "shared")
    main(["attention", "--ckpt_path", str(run / "shared"), "--prompt", "KING", "--out", "heads.png"])
    assert (tmp_path / "heads.png").stat().st_size > 0
    ckpt = run / "checkpoints/gpt-cpu-plays/version_0/last.ckpt"
    assert checkpoints.facts(run / "shared") == checkpoints.facts(ckpt)  # net, step, val loss, parameters...
    net, tokenizer, name = Runs(run, checkpoints.resolve(str(run / "shared"), run), "cpu").get(None)
    assert name == "shared" and tokenizer.vocab_size == net.config["vocab_size"]


def refused(*args) -> str:
    """The one line a command run in this process exits with."""
    with pytest.raises(SystemExit) as exit:
        main(list(args))
    assert isinstance(exit.value.code, str) and "\n" not in exit.value.code
    return exit.value.code


def test_an_existing_folder_is_replaced_only_when_asked_and_only_if_it_is_an_export(run, tmp_path):
    ckpt = str(run / "checkpoints/gpt-cpu-plays/version_0/last.ckpt")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    for flags, message in [
        (["--to", str(run / "shared")], "holds an export already: pass --overwrite to replace it"),
        (["--to", str(notes), "--overwrite", "true"], "holds files that are no export's (todo.txt)"),
        (["--to", str(notes / "todo.txt")], "is a regular file: pass a folder"),
    ]:
        assert message in refused("export", "--ckpt_path", ckpt, *flags)
    assert (notes / "todo.txt").read_text() == "mine"
    before = (run / "shared/config.json").read_text()
    main(["export", "--ckpt_path", ckpt, "--to", str(tmp_path / "again")])
    main(["export", "--ckpt_path", str(tmp_path / "again"), "--to", str(tmp_path / "again"), "--overwrite", "true"])
    assert (tmp_path / "again/config.json").read_text() == before  # an export of an export is the same export
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_a_failed_export_leaves_no_folder(run, small_disk):
    big = run / "checkpoints/gpt-cpu-plays/version_0/last.ckpt"
    (small_disk / "filler").write_bytes(b"\0" * (2**21 - 2**14))  # nearly all of 2 MiB: the weights do not fit
    line = refused("export", "--ckpt_path", str(big), "--to", str(small_disk / "model"))
    assert line.endswith("failed (No space left on device): nothing was written")
    assert [p.name for p in small_disk.iterdir()] == ["filler"]


def tamper(folder, tmp_path, edit) -> str:
    bad = tmp_path / "bad"
    subprocess.run(["cp", "-r", str(folder), str(bad)], check=True)
    edit(bad)
    return str(bad)


def config_edit(change):
    def edit(folder):
        config = json.loads((folder / "config.json").read_text())
        change(config)
        (folder / "config.json").write_text(json.dumps(config))

    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda f: (f / "config.json").write_text("{not json"), "its config.json is not JSON"),
        (config_edit(lambda c: c.update(charlm_export=7)), 'its config.json has no "charlm_export": 1'),
        (config_edit(lambda c: c["init_args"].update(n_layer="two")), "its init_args 'n_layer' is"),
        (config_edit(lambda c: c["init_args"].update(n_embd=64)), "its weights do not match its init_args"),
        (config_edit(lambda c: c.update(net="os.system")), "its net 'charlm.models.os.system' is not one of"),
        (config_edit(lambda c: c["tokenizer"].update(chars="ab")), "its tokenizer has 2 ids"),
        (config_edit(lambda c: c["trained"]["text"].update(sha256="x")), "its text's sha256 'x' is no sha256"),
        (lambda f: (f / "model.safetensors").write_bytes(b""), "its model.safetensors cannot be read"),
        (
            lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:-100]),
            "its model.safetensors cannot be read",
        ),
        (lambda f: (f / "model.safetensors").unlink(), "its model.safetensors is missing"),
    ],
    ids=["not JSON", "format", "a type", "a size", "a class", "vocabulary", "sha256", "empty", "cut", "missing"],
)
def test_a_tampered_export_is_one_line_in_every_command(run, corpus, tmp_path, edit, message):
    bad = tamper(run / "shared", tmp_path, edit)
    for command in (
        ["generate", "--ckpt_path", bad],
        ["attention", "--ckpt_path", bad, "--prompt", "KING"],
        ["export", "--ckpt_path", bad, "--to", str(tmp_path / "out")],
        ["fit", "--model.init_from", bad, "--data.path", str(corpus)],
    ):
        line = refused(*command)
        assert f"{bad} is not a charlm export (" in line and message in line
        assert line.endswith("pass a folder charlm export wrote")
    assert not (tmp_path / "out").exists() and not (tmp_path / "attention.png").exists()


# --- the exported page, in a real headless Chromium, from a plain static file server -------------------------------


@pytest.fixture(scope="module")
def site(run):
    """The page that export --web writes, served as files by Python's http.server on 127.0.0.1."""
    ckpt = run / "checkpoints/gpt-cpu-plays/version_0/last.ckpt"
    main(["export", "--ckpt_path", str(ckpt), "--web", "true", "--to", str(run / "site")])
    with serving(run / "site") as url:
        yield url


@contextlib.contextmanager
def serving(folder):
    handler = functools.partial(QuietFiles, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()


class QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def tab(browser, site):
    with open_page(browser, site) as page:
        yield page


def test_the_exported_page_runs_the_model_in_the_tab_as_charlm_generate_does(tab, run, capsys):
    """Greedy text (past block_size, so the cache re-fills) exactly as charlm generate prints it; each character's
    candidates as the server sends them, to 1e-4; a clicked character's attention as the net computes it."""
    tab.fill("#prompt", "KING")
    tab.fill("#temperature", "0")
    tab.fill("#max_new_tokens", "120")
    tab.click("#generate")
    tab.wait_for_selector("#output[data-state=done]")
    ckpt = run / "checkpoints/gpt-cpu-plays/version_0/last.ckpt"
    main(["generate", "--ckpt_path", str(ckpt), "--prompt", "KING", "--temperature", "0", "--max_new_tokens", "120"])
    assert shown_text(tab) == capsys.readouterr().out.removesuffix("\n")

    net, tokenizer = checkpoints.load_net(ckpt)
    names = [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]
    settings = Sampling(prompt="KING", temperature=0, max_new_tokens=120)
    expected = []
    for next_id, probs in sampling.generate(net, torch.tensor([tokenizer.encode("KING")]), settings, with_probs=True):
        expected.append(candidates(names, probs[0], 10, next_id.item()))
    tokens = tab.evaluate("state.tokens.filter(t => !t.prompt).map(t => [t.p, t.top])")
    assert len(tokens) == len(expected) == 120
    for (p, top), (want_p, want_top) in zip(tokens, expected):
        assert p == pytest.approx(want_p, abs=1e-4)
        assert [label for label, _ in top] == [label for label, _ in want_top]
        assert [q for _, q in top] == pytest.approx([q for _, q in want_top], abs=1e-4)

    tab.click("#output .tok.gen >> nth=50")  # past block_size 32: the window is the last 32 characters
    tab.wait_for_selector("#heads figure")
    answer = tab.evaluate("state.attention")
    ids = tab.evaluate("state.tokens.slice(0, state.picked + 1).map(t => t.id)")
    assert answer["first"] == len(ids) - 32 and tab.locator("#heads figure").count() == 2  # 1 layer x 2 heads
    maps = net.attention(torch.tensor([ids[answer["first"] :]]))[:, 0, :, -1]
    assert torch.allclose(torch.tensor(answer["weights"], dtype=torch.float64), maps.double(), atol=1e-4)
    assert tab.text_content("#candidates .row.drawn .char") is not None


def test_the_exported_page_computes_every_option_of_the_gpt_as_charlm_does(browser, corpus, tmp_path, monkeypatch):
    """QK-norm, ReLU², the logit cap, value embeddings and an untied head: each character's probability in the tab is
    the one charlm computes, to 1e-4."""
    monkeypatch.chdir(tmp_path)
    options = dict(qk_norm="true", mlp="relu2", logit_cap="3", value_embeds="true", tie_embeddings="false")
    flags = [flag for name, value in options.items() for flag in (f"--model.net.init_args.{name}", value)]
    main(["fit", *tiny(corpus), *flags, "--generation.max_new_tokens", "0"])
    main(["export", "--web", "true", "--to", "site"])
    net, tokenizer = checkpoints.load_net(tmp_path / "site")
    chosen = {name: net.config[name] for name in options}
    assert chosen == dict(qk_norm=True, mlp="relu2", logit_cap=3.0, value_embeds=True, tie_embeddings=False)
    settings = Sampling(prompt="KING", temperature=0, max_new_tokens=60)
    start = torch.tensor([tokenizer.encode("KING")])
    expected = [probs[0, i.item()].item() for i, probs in sampling.generate(net, start, settings, with_probs=True)]
    with serving(tmp_path / "site") as url, open_page(browser, url) as tab:
        tab.fill("#prompt", "KING")
        tab.fill("#temperature", "0")
        tab.fill("#max_new_tokens", "60")
        tab.click("#generate")
        tab.wait_for_selector("#output[data-state=done]")
        assert tab.evaluate("state.tokens.filter(t => !t.prompt).map(t => t.p)") == pytest.approx(expected, abs=1e-4)


def test_the_exported_page_samples_with_its_seed_and_says_what_it_cannot_take(tab):
    def sample(seed: str) -> str:
        tab.fill("#seed", seed)
        tab.click("#generate")
        tab.wait_for_selector("#output[data-state=done]")
        return shown_text(tab)

    tab.fill("#max_new_tokens", "200")
    assert sample("3") == sample("3") != sample("4")
    tab.fill("#prompt", "KING ë")
    tab.click("#generate")
    tab.wait_for_selector("#output[data-state=error]")
    assert "not among the model's" in tab.text_content("#status")


def test_the_exported_page_streams_10000_characters_and_keeps_only_what_it_shows(tab):
    """What a long stream leaves in the tab's memory is its characters and their candidates, not the model's work:
    the heap after 10,000 characters, less the heap after 1,000, is under 2 KB a character."""
    session = tab.context.new_cdp_session(tab)

    def heap_after(n: int) -> int:
        tab.fill("#max_new_tokens", str(n))
        tab.click("#generate")
        tab.wait_for_selector("#output[data-state=done]", timeout=120_000)
        assert tab.locator("#output .tok.gen").count() == n
        session.send("HeapProfiler.collectGarbage")
        return session.send("Runtime.getHeapUsage")["usedSize"]

    small, large = heap_after(1_000), heap_after(10_000)
    assert large - small < 9_000 * 2048, (small, large)
