"""Interruptions: Ctrl-C, SIGTERM and SIGKILL (also during a save), a full disk, a NaN loss, two runs in one folder.

The promise under test: the newest checkpoint on disk is always whole, and a resumed run is the run that would
have happened without the interruption: bitwise the same weights, and curves with every step exactly once.
"""

import os
import random
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, fill, scalars, tiny, wait_for_new_save

from charlm.__main__ import main

MAX_STEPS = 30


def flags(corpus) -> list[str]:
    """A tiny GPT with dropout (so the random state matters), validating every 4 steps, saving last every 3."""
    return [
        *tiny(corpus, max_steps=MAX_STEPS),
        "--model.net.init_args.dropout", "0.1",
        "--trainer.val_check_interval", "4",
        "--checkpoint.save_last_every_n_steps", "3",
        "--generation.max_new_tokens", "5",
    ]  # fmt: skip


def start(corpus, cwd, *extra) -> subprocess.Popen:
    command = [sys.executable, "-m", "charlm", "fit", *flags(corpus), *extra]
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(corpus, cwd) -> None:
    process = start(corpus, cwd, "--ckpt_path", "last")
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err


def weights(cwd) -> dict[str, torch.Tensor]:
    ckpt = torch.load(cwd / "checkpoints/gpt-cpu-plays/version_0/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == MAX_STEPS
    return ckpt["state_dict"]


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("straight")
    process = start(corpus, cwd)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    return cwd


def assert_same_run(cwd, uninterrupted) -> None:
    straight, resumed = weights(uninterrupted), weights(cwd)
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)  # bitwise, on CPU
    logs = sorted((cwd / "logs/gpt-cpu-plays").iterdir())
    assert len(logs) == 1  # the resumed runs went on in the interrupted run's log folder
    curves, expected = scalars(logs[0]), scalars(uninterrupted / "logs/gpt-cpu-plays/version_0")
    for tag in ("train/loss", "val/loss", "train/lr"):
        assert [step for step, _ in curves[tag]] == [step for step, _ in expected[tag]]  # each step exactly once
    assert curves["val/loss"] == expected["val/loss"]


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_last_and_the_resumed_run_equals_an_uninterrupted_one(
    corpus, tmp_path, uninterrupted, signum, code
):
    process = start(corpus, tmp_path)
    wait_for_new_save(process, tmp_path / "checkpoints/gpt-cpu-plays/version_0")
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code
    step = torch.load(tmp_path / "checkpoints/gpt-cpu-plays/version_0/last.ckpt", weights_only=True)["global_step"]
    assert 0 < step < MAX_STEPS
    assert err.strip().splitlines()[-1] == (
        f"charlm: {signal.Signals(signum).name} received: stopped after step {step}; "
        f"saved {tmp_path}/checkpoints/gpt-cpu-plays/version_0/last.ckpt; resume with --ckpt_path last"
    )
    finish(corpus, tmp_path)
    assert_same_run(tmp_path, uninterrupted)


def test_sigkill_at_random_moments_and_during_saves_then_resume(corpus, tmp_path, uninterrupted):
    """Kill -9 four times: twice at a random moment after a save, twice the moment a save begins; then finish."""
    ckpts, moments = tmp_path / "checkpoints/gpt-cpu-plays/version_0", random.Random(0)
    resume: list[str] = []
    for during_save in (False, True, False, True):
        process = start(corpus, tmp_path, *resume)
        if during_save:  # the temporary file exists from the first byte of a save until its rename
            saving = f".saving-{process.pid}-"  # the temporary file of any of its saves
            while not (ckpts.is_dir() and any(name.startswith(saving) for name in os.listdir(ckpts))):
                assert process.poll() is None, "the run ended before it saved"
        else:
            wait_for_new_save(process, ckpts)
            time.sleep(moments.uniform(0, 0.05))  # a step or two: a whole run takes about a second
        process.kill()
        process.communicate()
        assert [p.name for p in ckpts.glob("last*")] in ([], ["last.ckpt"])  # a cut-short save is never a last*
        if (ckpts / "last.ckpt").exists():
            torch.load(ckpts / "last.ckpt", weights_only=True)  # whole, whatever the moment of the kill
            resume = ["--ckpt_path", "last"]
    finish(corpus, tmp_path)
    assert not list(ckpts.glob(".saving-*"))  # the next run cleans up what a kill left
    assert_same_run(tmp_path, uninterrupted)


WIDE = ["--model.net.init_args.n_layer", "4", "--model.net.init_args.n_embd", "256", "--data.batch_size", "64"]


@pytest.mark.parametrize(
    "command, signum",
    [
        (["validate", *WIDE], signal.SIGTERM),  # Lightning's SIGTERMException alone exits 0 here
        (["fit", *WIDE, "--trainer.num_sanity_val_steps", "-1"], signal.SIGINT),  # in the sanity check
    ],
)
def test_a_signal_outside_a_training_step_exits_128_plus_its_number_in_one_line(corpus, tmp_path, command, signum):
    """A scheduler that stops a validation or a run still setting up must see it fail, and nothing saved."""
    text = tmp_path / "long.txt"  # a validation of 100,000 characters: seconds long, time to send the signal
    text.write_text(corpus.read_text() * 10)
    args = [*command[:1], "--config", str(ROOT / "configs/gpt-cpu.yaml"), "--data.path", str(text), *command[1:]]
    if command[0] == "validate":  # any checkpoint of the right shape: a signal, not the score, is the point
        main(["fit", *args[1:], "--trainer.max_steps", "1", "--data.val_tokens", "100", "--trainer.logger", "false"])
        args += ["--ckpt_path", "last"]
    probe = ["--trainer.callbacks+=probes.SayValidating"]
    process = subprocess.Popen(
        [sys.executable, "-m", "charlm", *args, "--trainer.logger", "false", *probe],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONPATH": str(ROOT / "tests")},
    )
    while "probe: validating" not in process.stderr.readline():  # Lightning's handlers and charlm's are in place
        assert process.poll() is None
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"charlm: {signal.Signals(signum).name} received: stopped"


def test_ctrl_c_in_the_last_validation_stops_the_run_with_last_saved(corpus, tmp_path):
    text = tmp_path / "long.txt"  # a validation of 100,000 characters: seconds long, time for the signal to land in it
    text.write_text(corpus.read_text() * 10)
    args = ["fit", "--config", str(ROOT / "configs/gpt-cpu.yaml"), "--data.path", str(text), *WIDE]
    args += ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.num_sanity_val_steps", "0"]
    probe = ["--trainer.callbacks+=probes.SayValidating", "--generation.max_new_tokens", "0"]
    process = subprocess.Popen(
        [sys.executable, "-m", "charlm", *args, *probe],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONPATH": str(ROOT / "tests")},
    )
    while "probe: validating" not in process.stderr.readline():  # the validation of the last step
        assert process.poll() is None
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    last = "checkpoints/gpt-cpu-long/version_0/last.ckpt"
    assert process.returncode == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"charlm: SIGINT received: stopped after step 2; saved {tmp_path / last}; resume with --ckpt_path last"
    )
    assert torch.load(tmp_path / last, weights_only=True)["global_step"] == 2


def test_ctrl_c_in_generate_and_a_closed_pipe_stop_quietly(corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", *tiny(corpus, max_steps=2)])
    sample = [sys.executable, "-m", "charlm", "generate", "--ckpt_path", "last", "--max_new_tokens", "1000000"]
    process = subprocess.Popen(sample, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.read(100)  # it is generating
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and err.strip().splitlines()[-1] == "charlm: SIGINT received: stopped"
    piped = subprocess.run(f"{shlex.join(sample)} | head -c 100", shell=True, cwd=tmp_path, capture_output=True)
    assert len(piped.stdout) == 100 and b"error" not in piped.stderr and b"Traceback" not in piped.stderr
    closed = subprocess.run(f"{shlex.join(sample)} >&-", shell=True, cwd=tmp_path, capture_output=True, text=True)
    assert closed.returncode == 1 and closed.stderr.strip() == (
        "charlm: error: stdout is closed, and generate writes the text there: send it to a file or a pipe"
    )


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(corpus, tmp_path, small_disk):
    ckpts = small_disk / "ckpts"
    run = ["fit", *tiny(corpus, max_steps=2), "--checkpoint.dirpath", str(ckpts)]
    main(run)
    before = {p.name: p.read_bytes() for p in ckpts.glob("*.ckpt")}
    fill(small_disk, leave=100_000)  # half a checkpoint: the disk fills while torch writes a tensor
    with pytest.raises(SystemExit) as exit_info:
        main([*run, "--trainer.max_steps", "4", "--ckpt_path", "last"])
    last_line = str(exit_info.value.code)
    assert last_line.startswith(f"charlm: error: could not save {ckpts}/step4-val") and last_line.endswith(
        ".ckpt (No space left on device): the checkpoints already there are intact; free some disk space, then "
        "resume with --ckpt_path last"
    )
    assert {p.name: p.read_bytes() for p in ckpts.glob("*.ckpt")} == before  # last and best as they were
    assert not list(ckpts.glob(".saving-*"))


def test_a_nan_loss_stops_the_run_and_keeps_the_checkpoints(corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", *tiny(corpus, max_steps=2)])
    ckpts = tmp_path / "checkpoints/gpt-cpu-plays/version_0"
    before = {p: p.read_bytes() for p in ckpts.glob("*.ckpt")}
    ckpt = torch.load(ckpts / "last.ckpt", weights_only=True)
    ckpt["state_dict"]["net.wte.weight"][0, 0] = float("inf")  # weights gone bad, as after a blow-up
    torch.save(ckpt, tmp_path / "diverged.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *tiny(corpus), "--ckpt_path", "diverged.ckpt", "--trainer.num_sanity_val_steps", "0"])
    assert str(exit_info.value.code).startswith("charlm: error: the training loss is nan at step 3: stopped")
    assert {p: p.read_bytes() for p in ckpts.glob("*.ckpt")} == before  # neither last nor best was overwritten


def test_a_nan_validation_stops_the_run_before_any_checkpoint_of_those_weights(corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blow_up = ["--model.lr", "1e38", "--model.min_lr", "0", "--model.warmup_steps", "0"]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *tiny(corpus), *blow_up, "--trainer.val_check_interval", "1"])
    assert str(exit_info.value.code).startswith("charlm: error: the val loss is nan after step 1: stopped")
    assert not list(
        (tmp_path / "checkpoints/gpt-cpu-plays/version_0").glob("*.ckpt")
    )  # no "best" at val 0.0, no last.ckpt


def test_validate_fails_on_weights_that_give_a_nan_loss(corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", *tiny(corpus, max_steps=2)])
    ckpt = torch.load(tmp_path / "checkpoints/gpt-cpu-plays/version_0/last.ckpt", weights_only=True)
    ckpt["state_dict"]["net.ln_f.weight"].fill_(float("nan"))
    torch.save(ckpt, tmp_path / "nan.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", *tiny(corpus), "--ckpt_path", "nan.ckpt"])
    assert str(exit_info.value.code).startswith("charlm: error: the val loss is nan after step")


def test_a_symlinked_lock_is_refused_and_its_target_is_left_alone(corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("my notes\n")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/.charlm-lock").symlink_to(tmp_path / "notes.txt")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *tiny(corpus), "--checkpoint.dirpath", "mine"])
    assert "mine/.charlm-lock cannot be opened" in str(exit_info.value.code)
    assert (tmp_path / "notes.txt").read_text() == "my notes\n"


def test_two_runs_cannot_write_into_one_checkpoint_folder(corpus, tmp_path):
    first = start(corpus, tmp_path, "--trainer.max_steps", "100000")
    wait_for_new_save(first, tmp_path / "checkpoints/gpt-cpu-plays/version_0")
    live_log = sorted((tmp_path / "logs/gpt-cpu-plays/version_0").iterdir())
    second = subprocess.run(
        [sys.executable, "-m", "charlm", "fit", *flags(corpus), "--ckpt_path", "last"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert second.returncode == 1
    assert second.stderr.strip().splitlines()[-1] == (
        f"charlm: error: {tmp_path}/checkpoints/gpt-cpu-plays/version_0/ is in use by another run (pid {first.pid}): "
        "wait for it to finish, or pass --checkpoint.dirpath with another folder"
    )
    assert sorted((tmp_path / "logs/gpt-cpu-plays/version_0").iterdir()) == live_log  # no events file of its own
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)
    assert first.returncode == 143  # the first run went on undisturbed until it was told to stop
