"""Untrusted checkpoints: whatever a .ckpt file holds, every command answers with one line and builds nothing big.

Each case is a real checkpoint of a tiny run, changed the way a careless or hostile hand would change it, saved to
disk and given to the commands that read that part of it.
"""

import copy
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import tiny

from charlm.__main__ import main

ALL = ("fit", "validate", "generate", "attention", "fine-tune")  # each builds the net the checkpoint describes
RESUME = ("fit",)  # what only resuming training reads: optimizer, schedule, generators


def net_args(ckpt: dict) -> dict:
    return ckpt["hyper_parameters"]["net"]["init_args"]


def saver_state(ckpt: dict) -> dict:
    return next(iter(ckpt["callbacks"].values()))


CASES = {
    "a list": (ALL, lambda c: [1, 2], "its content is list"),
    "no weights": (ALL, lambda c: c.update(state_dict=[1]), "its state_dict is list"),
    "a weight that is a number": (ALL, lambda c: c["state_dict"].update({"net.wte.weight": 5}), "its weight"),
    "a weight missing": (ALL, lambda c: c["state_dict"].pop("net.ln_f.weight"), "ln_f.weight is absent"),
    "init_args a list": (ALL, lambda c: c["hyper_parameters"]["net"].update(init_args=[1]), "init_args is list"),
    "a vocabulary that is a number": (ALL, lambda c: c["CharDataModule"].update(chars=65), "its vocabulary"),
    "a weight of integers": (
        ALL,
        lambda c: c["state_dict"].update({"net.ln_f.weight": torch.ones(32, dtype=torch.long)}),
        "torch.int64 on cpu, not real numbers",
    ),
    "a sparse weight": (
        ALL,
        lambda c: c["state_dict"].update({"net.ln_f.weight": c["state_dict"]["net.ln_f.weight"].to_sparse()}),
        "its state_dict.net.ln_f.weight is a torch.sparse_coo tensor, not a dense one",
    ),
    "a sparse moment": (
        ALL,
        lambda c: (state := c["optimizer_states"][0]["muon"]["state"][0]).update(
            momentum_buffer=state["momentum_buffer"].to_sparse()
        ),
        "its optimizer_states[0].muon.state.0.momentum_buffer is a torch.sparse_coo tensor",
    ),
    "a callback state that is a list": (ALL, lambda c: c["callbacks"].update(x=[1]), "callback state 'x' is list"),
    "a best path that is a number": (ALL, lambda c: saver_state(c).update(best_model_path=5), "best_model_path is"),
    "a step that is text": (ALL, lambda c: c.update(global_step="5"), "its global_step is str '5'"),
    "a log version that is a path": (ALL, lambda c: c.update(log_version="0/../../x"), "its log_version is str"),
    "a source that is a number": (ALL, lambda c: c["hyper_parameters"].update(init_from=5), "its init_from is int '5'"),
    "a vocabulary of 10^9": (ALL, lambda c: net_args(c).update(vocab_size=10**9), "{'vocab_size': 1000000000}"),
    "a width of 2^20": (ALL, lambda c: net_args(c).update(n_embd=2**20), "{'n_embd': 1048576} exceeds"),
    "10^6 layers": (ALL, lambda c: net_args(c).update(n_layer=10**6), "{'n_layer': 1000000} exceeds"),
    "a context of 10^12": (ALL, lambda c: net_args(c).update(block_size=10**12), "{'block_size': 1000000000000}"),
    "an unknown argument": (ALL, lambda c: net_args(c).update(evil=1), "unexpected keyword argument 'evil'"),
    "a width that is text": (ALL, lambda c: net_args(c).update(n_embd="32"), "not a charlm checkpoint"),
    "a width the weights do not have": (ALL, lambda c: net_args(c).update(n_embd=16), "do not match its init_args"),
    "a vocabulary the net does not have": (ALL, lambda c: c["CharDataModule"].update(chars="abc"), "3 ids, its net 65"),
    "weights gone to NaN": (  # resume and validate stop at their first loss (test_resume.py)
        ("generate", "attention", "fine-tune"),
        lambda c: c["state_dict"]["net.ln_f.weight"].fill_(float("nan")),
        "its weight ln_f.weight holds NaN or infinity (the run diverged): pass an earlier one",
    ),
    "generators of floats": (RESUME, lambda c: c["rng_states"].update(torch=torch.zeros(3)), "torch.float32"),
    "no optimizer": (RESUME, lambda c: c.update(optimizer_states=None), "its optimizer_states is NoneType"),
    "an AdamW moment of another shape": (
        RESUME,
        lambda c: c["optimizer_states"][0]["adamw"]["state"][0].update(exp_avg=torch.zeros(2)),
        "its optimizer exp_avg of parameter 0 is [2]",
    ),
    "a Muon momentum of another shape": (
        RESUME,
        lambda c: c["optimizer_states"][0]["muon"]["state"][1].update(momentum_buffer=torch.zeros(3, 2)),
        "its optimizer momentum_buffer of parameter 1 is [3, 2]",
    ),
    "a Muon momentum of no shape": (
        RESUME,
        lambda c: c["optimizer_states"][0]["muon"]["state"][1].update(momentum_buffer=torch.zeros(())),
        "its optimizer momentum_buffer of parameter 1 is []",
    ),
    "10^9 Newton-Schulz rounds": (
        RESUME,
        lambda c: c["optimizer_states"][0]["muon"]["param_groups"][0].update(ns_steps=10**9),
        "its optimizer's ns_steps is 1000000000, charlm's 5",
    ),
    "an AdamW group more": (
        RESUME,
        lambda c: (groups := c["optimizer_states"][0]["adamw"]["param_groups"]).append(dict(groups[0], params=[])),
        "its optimizer has 3 parameter groups, charlm's 2",
    ),
    "no Muon state": (RESUME, lambda c: c["optimizer_states"][0].pop("muon"), "its optimizer_states[0] has no 'muon'"),
    "an unknown optimizer": (
        RESUME,
        lambda c: c["hyper_parameters"].update(optimizer="sgd\nx"),
        "cannot be resumed (its optimizer is 'sgd\\nx', not adamw or muon)",
    ),
    "a schedule peaking at 0": (
        RESUME,
        lambda c: c["lr_schedulers"][0].update(base_lrs=[0.0, 0.01, 0.05]),
        "its schedule's base_lrs [0.0, 0.01, 0.05] are not one learning rate > 0 per group",
    ),
    "no schedule": (RESUME, lambda c: c.update(lr_schedulers=[None]), "its lr_schedulers[0] is NoneType"),
    "no loops": (("fit", "validate"), lambda c: c.update(loops=None), "its loops is NoneType"),
}


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    """A tiny run's folder and its last checkpoint, as loaded."""
    cwd = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        main(["fit", *tiny(corpus, max_steps=2)])
    return cwd, torch.load(cwd / "checkpoints/gpt-cpu-plays/version_0/last.ckpt", weights_only=True)


def commands(corpus, path) -> dict[str, list[str]]:
    return {
        "fit": ["fit", *tiny(corpus), "--ckpt_path", str(path)],
        "validate": ["validate", *tiny(corpus), "--ckpt_path", str(path)],
        "generate": ["generate", "--ckpt_path", str(path), "--max_new_tokens", "5"],
        "attention": ["attention", "--ckpt_path", str(path), "--out", "picture.png"],
        "fine-tune": ["fit", "--data.path", str(corpus), "--model.init_from", str(path)],
    }


@pytest.mark.parametrize("case", CASES)
def test_a_tampered_checkpoint_is_one_line_in_every_command_and_nothing_is_written(run, corpus, case, monkeypatch):
    cwd, saved = run
    monkeypatch.chdir(cwd)
    names, change, message = CASES[case]
    ckpt = copy.deepcopy(saved)
    changed = change(ckpt)
    torch.save(changed if isinstance(changed, list) else ckpt, cwd / "tampered.ckpt")
    before = sorted((p, p.stat().st_mtime_ns) for p in cwd.rglob("*") if p.name != "tampered.ckpt")
    for name in names:
        with pytest.raises(SystemExit) as exit_info:
            main(commands(corpus, cwd / "tampered.ckpt")[name])
        error = str(exit_info.value.code)
        assert error.startswith("charlm: error: ") and "tampered.ckpt" in error and "\n" not in error, (name, error)
        assert message in error, (name, error)
    assert sorted((p, p.stat().st_mtime_ns) for p in cwd.rglob("*") if p.name != "tampered.ckpt") == before


def test_any_bytes_as_a_checkpoint_are_one_line(run, tmp_path, monkeypatch):
    """Text, random bytes and a checkpoint cut short: each an error the unpickler raises its own way."""
    cwd, _ = run
    monkeypatch.chdir(tmp_path)
    whole = (cwd / "checkpoints/gpt-cpu-plays/version_0/last.ckpt").read_bytes()
    for content in (bytes(range(256)) * 8, whole[: len(whole) // 2], b"hello there\n"):
        (tmp_path / "broken.ckpt").write_bytes(content)
        with pytest.raises(SystemExit) as exit_info:
            main(["generate", "--ckpt_path", "broken.ckpt"])
        assert str(exit_info.value.code).startswith("charlm: error: broken.ckpt is not a valid checkpoint (")
    result = subprocess.run(  # the last, as a person sees it
        [sys.executable, "-m", "charlm", "generate", "--ckpt_path", "broken.ckpt"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("charlm: error: broken.ckpt is not a valid checkpoint")


def test_a_fifo_or_a_device_where_a_checkpoint_should_be_is_refused_without_opening_it(run, corpus, tmp_path):
    """Opening a FIFO waits for a writer, and a device reads forever: each is refused from its kind alone. A new
    process runs the commands, so that a regression hangs only it, until its timeout."""
    cwd, _ = run
    shutil.copytree(cwd / "checkpoints", tmp_path / "checkpoints")
    os.mkfifo(tmp_path / "pipe.ckpt")
    (tmp_path / "zero.ckpt").symlink_to("/dev/zero")
    (tmp_path / "checkpoints/odd").mkdir()
    os.mkfifo(tmp_path / "checkpoints/odd/last.ckpt")  # the newest last.ckpt under checkpoints/, and no file
    cases = [
        ["generate", "--ckpt_path", "pipe.ckpt"],
        ["generate", "--ckpt_path", "zero.ckpt"],
        ["generate", "--ckpt_path", "checkpoints/odd"],
        ["fit", *tiny(corpus), "--model.init_from", "pipe.ckpt"],
        ["generate", "--ckpt_path", "last", "--max_new_tokens", "3"],
    ]
    code = f"""from charlm.__main__ import main
for argv in {cases!r}:
    try:
        main(argv)
    except SystemExit as e:
        print(e.code, flush=True)
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.stdout.splitlines()[:4] == [
        "charlm: error: --ckpt_path pipe.ckpt is a FIFO, not a checkpoint: pass a .ckpt file, a folder, last, best",
        "charlm: error: --ckpt_path zero.ckpt is a device, not a checkpoint: pass a .ckpt file, a folder, last, best",
        "charlm: error: --ckpt_path checkpoints/odd: checkpoints/odd/last.ckpt is a FIFO, not a checkpoint: remove "
        "it, or pass a file",
        "charlm: error: --model.init_from pipe.ckpt is a FIFO, not a checkpoint: pass a .ckpt file, a folder, last, "
        "best",
    ]
    assert "sampling from checkpoints/gpt-cpu-plays/version_0/last.ckpt" in result.stderr  # the FIFO passed over


def test_a_checkpoint_saved_before_the_gpts_options_is_read_as_the_gpt_it_was(corpus, tmp_path, monkeypatch, capsys):
    """Learned positions and no QK-norm, the defaults of their day: a checkpoint without these init_args (or the
    other options, newer still) generates what it did, and fine-tunes."""
    monkeypatch.chdir(tmp_path)
    options = ["--model.net.init_args.pos_emb", "learned", "--model.net.init_args.qk_norm", "false"]
    main(["fit", *tiny(corpus, max_steps=2), *options, "--generation.max_new_tokens", "0"])
    ckpt = torch.load("checkpoints/gpt-cpu-plays/version_0/last.ckpt", weights_only=True)
    for name in ("pos_emb", "qk_norm", "mlp", "zero_init", "logit_cap", "value_embeds", "tie_embeddings"):
        del net_args(ckpt)[name]
    torch.save(ckpt, "old.ckpt")
    capsys.readouterr()
    texts = []
    for path in ("checkpoints/gpt-cpu-plays/version_0/last.ckpt", "old.ckpt"):
        main(["generate", "--ckpt_path", path, "--max_new_tokens", "40"])  # sampled, with the default seed
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and len(set(texts[1])) > 5
    main(["fit", *tiny(corpus, max_steps=1), "--model.init_from", "old.ckpt", "--generation.max_new_tokens", "0"])
