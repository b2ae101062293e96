"""Data-parallel training with Lightning's own DDP strategy, for real: two CPU processes talking over gloo."""

import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, charlm, scalars, tiny, wait_for_new_save

from charlm.__main__ import main

STEPS = 12
# block size 31: the validation split then has an odd number of windows, which two ranks cannot share evenly
BLOCK = ["--data.block_size", "31"]
DDP = [*BLOCK, "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
# probes.RecordTraining (tests/probes.py) saves what each rank trained on and its final weights
PROBE = ["--trainer.callbacks+=probes.RecordTraining"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}


def flags(corpus) -> list[str]:
    return [
        *tiny(corpus, max_steps=STEPS),
        *DDP,
        *PROBE,
        "--trainer.val_check_interval", "4",
        "--checkpoint.save_last_every_n_steps", "3",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def ddp_run(corpus, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("ddp")
    result = charlm("fit", *flags(corpus), cwd=cwd, env=ENV)
    assert result.returncode == 0, result.stderr
    return cwd, result


def test_ranks_train_on_different_windows_and_end_with_identical_weights(ddp_run):
    cwd, _ = ddp_run
    rank0, rank1 = (torch.load(cwd / f"probe-rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["inputs"].shape == rank1["inputs"].shape == (STEPS, 64, 31)  # 64 windows of 31 a step, each
    windows0 = {tuple(w.tolist()) for w in rank0["inputs"].flatten(0, 1)}
    windows1 = {tuple(w.tolist()) for w in rank1["inputs"].flatten(0, 1)}
    # the made-up corpus repeats itself, so a few windows of one rank also occur, by content, in the other's
    assert len(windows0 & windows1) < len(windows0) / 10
    assert all(torch.equal(rank0["state_dict"][k], rank1["state_dict"][k]) for k in rank0["state_dict"])


def test_checkpoints_logs_and_samples_are_written_once(ddp_run):
    cwd, result = ddp_run
    ckpts = sorted(p.name for p in (cwd / "checkpoints/gpt-cpu-plays/version_0").glob("*.ckpt"))
    assert len(ckpts) == 2 and "last.ckpt" in ckpts  # last and the best, nothing per rank
    assert [p.name for p in (cwd / "logs/gpt-cpu-plays").iterdir()] == ["version_0"]
    assert len(list((cwd / "logs/gpt-cpu-plays/version_0").glob("events.out.tfevents.*"))) == 1
    assert result.stdout.count(f"--- sample at step {STEPS} ---") == 1
    assert torch.load(cwd / "checkpoints/gpt-cpu-plays/version_0/last.ckpt", weights_only=True)["global_step"] == STEPS


def test_the_ddp_val_loss_is_the_exact_single_process_val_loss(ddp_run, corpus, capsys, monkeypatch):
    cwd, _ = ddp_run
    monkeypatch.chdir(cwd)
    ddp_loss = scalars(cwd / "logs/gpt-cpu-plays/version_0")["val/loss"][-1]
    assert ddp_loss[0] == STEPS - 1  # logged at the last step (Lightning counts from 0)
    capsys.readouterr()
    main(["validate", *tiny(corpus), *BLOCK, "--ckpt_path", "last", "--verbose", "true"])
    single = float(re.search(r"val/loss\s*│\s*([0-9.]+)", capsys.readouterr().out).group(1))  # every digit
    assert ddp_loss[1] == pytest.approx(single, rel=1e-6)


def test_ctrl_c_stops_every_rank_and_the_resumed_run_equals_an_uninterrupted_one(ddp_run, corpus, tmp_path):
    command = [sys.executable, "-m", "charlm", "fit", *flags(corpus)]
    process = subprocess.Popen(
        command, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for_new_save(process, tmp_path / "checkpoints/gpt-cpu-plays/version_0")
    process.send_signal(signal.SIGINT)  # to rank 0 only: the other rank learns of it and stops at the same step
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130
    step = torch.load(tmp_path / "checkpoints/gpt-cpu-plays/version_0/last.ckpt", weights_only=True)["global_step"]
    assert 0 < step < STEPS
    assert err.strip().splitlines()[-1].startswith(f"charlm: SIGINT received: stopped after step {step}; saved")
    assert "Error" not in err  # no rank died of a broken connection

    result = charlm("fit", *flags(corpus), "--ckpt_path", "last", cwd=tmp_path, env=ENV)
    assert result.returncode == 0, result.stderr
    straight = torch.load(ddp_run[0] / "checkpoints/gpt-cpu-plays/version_0/last.ckpt", weights_only=True)["state_dict"]
    resumed = torch.load(tmp_path / "checkpoints/gpt-cpu-plays/version_0/last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    curves = [scalars(folder / "logs/gpt-cpu-plays/version_0")["val/loss"] for folder in (ddp_run[0], tmp_path)]
    assert curves[0] == curves[1]
