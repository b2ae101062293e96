"""Data-parallel training with Lightning's own DDP strategy, for real: two CPU processes talking over gloo."""

import os

import pytest
import torch
from conftest import ROOT, charlm, scalars, tiny

# 31: the validation split then has an odd number of windows, which two ranks cannot share evenly
BLOCK = ["--data.block_size", "31"]
DDP = [*BLOCK, "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]


def ddp_fit(corpus, cwd, *extra):
    # probes.RecordTraining (tests/probes.py) writes what each rank trained on and its final weights
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    result = charlm("fit", *tiny(corpus), *DDP, "--trainer.callbacks+=probes.RecordTraining", *extra, cwd=cwd, env=env)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def ddp_run(corpus, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("ddp")
    return cwd, ddp_fit(corpus, cwd)


def test_ranks_train_on_different_windows_and_end_with_identical_weights(ddp_run):
    cwd, _ = ddp_run
    rank0, rank1 = (torch.load(cwd / f"probe-rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["inputs"].shape == rank1["inputs"].shape == (4, 64, 31)  # 4 steps of 64 windows each
    windows0 = {tuple(w.tolist()) for w in rank0["inputs"].flatten(0, 1)}
    windows1 = {tuple(w.tolist()) for w in rank1["inputs"].flatten(0, 1)}
    assert not windows0 & windows1
    assert all(torch.equal(rank0["state_dict"][k], rank1["state_dict"][k]) for k in rank0["state_dict"])


def test_checkpoints_logs_and_samples_are_written_once(ddp_run):
    cwd, result = ddp_run
    ckpts = sorted(p.name for p in (cwd / "checkpoints/gpt-cpu").glob("*.ckpt"))
    assert len(ckpts) == 2 and "last.ckpt" in ckpts  # last and the best, nothing per rank
    assert [p.name for p in (cwd / "logs/gpt-cpu").iterdir()] == ["version_0"]
    assert len(list((cwd / "logs/gpt-cpu/version_0").glob("events.out.tfevents.*"))) == 1
    assert result.stdout.count("--- sample at step 4 ---") == 1
    ckpt = torch.load(cwd / "checkpoints/gpt-cpu/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4


def test_the_ddp_val_loss_is_the_exact_single_process_val_loss(ddp_run, corpus):
    cwd, _ = ddp_run
    ddp_loss = scalars(cwd / "logs/gpt-cpu/version_0")["val/loss"][-1]
    assert ddp_loss[0] == 3  # logged at the last step (Lightning counts from 0)
    result = charlm("validate", *tiny(corpus), *BLOCK, "--ckpt_path", "checkpoints/gpt-cpu/last.ckpt", cwd=cwd)
    assert result.returncode == 0, result.stderr
    single = scalars(cwd / "logs/gpt-cpu/version_1")["val/loss"][-1][1]
    assert ddp_loss[1] == pytest.approx(single, rel=1e-6)


def test_a_resumed_ddp_run_equals_an_uninterrupted_one(ddp_run, corpus, tmp_path):
    cwd, _ = ddp_run
    # stop after 2 steps, then go on to 4: tiny() warms up for 2 steps, so the schedule of steps 0-1 does not
    # depend on max_steps and the two halves make exactly the 4-step run
    ddp_fit(corpus, tmp_path, "--trainer.max_steps", "2")
    ddp_fit(corpus, tmp_path, "--ckpt_path", "last")
    straight = torch.load(cwd / "checkpoints/gpt-cpu/last.ckpt", weights_only=True)
    resumed = torch.load(tmp_path / "checkpoints/gpt-cpu/last.ckpt", weights_only=True)
    assert resumed["global_step"] == 4
    assert all(torch.equal(straight["state_dict"][k], resumed["state_dict"][k]) for k in straight["state_dict"])
    assert (
        scalars(tmp_path / "logs/gpt-cpu/version_0")["val/loss"] == scalars(cwd / "logs/gpt-cpu/version_0")["val/loss"]
    )
