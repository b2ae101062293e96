"""`python -m charlm sweep`: Optuna trials of real fits, pruned, failed, shared by two workers, resumed after a kill."""

import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import optuna
import pytest
import yaml
from conftest import scalars
from optuna.trial import TrialState

from charlm.__main__ import main

SPACE = {"model.lr": {"low": 1e-5, "high": 0.1, "log": True}, "model.net.init_args.n_head": {"choices": [2, 4]}}
WITH_3_HEADS = SPACE | {"model.net.init_args.n_head": {"choices": [2, 3]}}
GOOD, UNBUILDABLE, HOPELESS = (
    {"model.lr": 0.03, "model.net.init_args.n_head": 2},
    {"model.lr": 0.01, "model.net.init_args.n_head": 3},  # 32 wide: not divisible by 3 heads
    {"model.lr": 1e-5, "model.net.init_args.n_head": 2},  # learns nothing in a few steps
)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "tiny.txt"
    path.write_text("hello world, hello charlm.\n" * 40)
    return path


def sweep_command(cwd, text, n_trials: int, max_steps: int = 6, space: dict = SPACE) -> list[str]:
    """A sweep of tiny GPTs (about a second a trial) validating every 2 steps."""
    (cwd / "space.yaml").write_text(yaml.safe_dump(space))
    return [
        "sweep", "--space", str(cwd / "space.yaml"), "--n_trials", str(n_trials), "--max_steps", str(max_steps),
        "--pruner_startup_trials", "1", "--seed", "0",
        "--",
        "--data.path", str(text),
        "--model.net.init_args.n_layer", "1",
        "--model.net.init_args.n_embd", "32",
        "--model.warmup_steps", "0",
        "--model.min_lr", "0",
        "--data.block_size", "16",
        "--trainer.val_check_interval", "2",
        "--trainer.enable_progress_bar", "false",
        "--generation.max_new_tokens", "0",
    ]  # fmt: skip


def load(cwd) -> optuna.Study:
    return optuna.load_study(study_name="space", storage=f"sqlite:///{cwd}/sweeps/space/study.db")


def queue(cwd, *trials: dict) -> None:
    """Decide the first trials' flags, through Optuna's own queue of the study the sweep will load."""
    (cwd / "sweeps/space").mkdir(parents=True)
    study = optuna.create_study(study_name="space", storage=f"sqlite:///{cwd}/sweeps/space/study.db")
    for params in trials:
        study.enqueue_trial(params)


@pytest.fixture(scope="module")
def swept(text, tmp_path_factory):
    """A 4-trial sweep, in-process: a good trial, one whose net cannot be built, a hopeless one, a sampled one."""
    cwd = tmp_path_factory.mktemp("sweep")
    queue(cwd, GOOD, UNBUILDABLE, HOPELESS)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        main(sweep_command(cwd, text, n_trials=4, space=WITH_3_HEADS))
    return cwd


def test_a_sweep_runs_its_trials_and_writes_the_best_as_a_config_that_fit_runs(swept, capsys, monkeypatch):
    trials = load(swept).get_trials()
    assert len(trials) == 4
    best = load(swept).best_trial
    assert best.number in (0, 3) and best.value == min(best.intermediate_values.values())
    for trial in trials:
        if trial.state == TrialState.COMPLETE:
            logged = scalars(swept / f"sweeps/space/trial_{trial.number}/version_0")
            assert [round(v, 6) for _, v in logged["val/loss"]] == [
                round(v, 6) for v in trial.intermediate_values.values()
            ]
            assert not (swept / f"sweeps/space/trial_{trial.number}/checkpoints").exists()  # removed unless asked
    monkeypatch.chdir(swept)
    capsys.readouterr()
    main(["fit", "--config", "sweeps/space/best.yaml"])  # as is: the best trial again, in a run of its own
    out = capsys.readouterr().out
    assert f"val loss {best.value:.4f} (" in out and "checkpoints/best-tiny/version_0" in out


def test_a_hopeless_trial_is_pruned_at_its_first_validation(swept):
    trial = load(swept).trials[2]
    assert trial.params == HOPELESS and trial.state == TrialState.PRUNED
    assert list(trial.intermediate_values) == [2]
    assert len(scalars(swept / "sweeps/space/trial_2/version_0")["val/loss"]) == 1


def test_a_trial_that_fails_is_recorded_with_its_reason_and_the_sweep_goes_on(swept):
    trial = load(swept).trials[1]
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["error"] == "n_embd=32 is not divisible by n_head=3: pick sizes where it is"
    assert load(swept).trials[3].state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def test_the_same_command_on_a_finished_study_runs_nothing_and_shows_its_table(swept, text, capsys, monkeypatch):
    monkeypatch.chdir(swept)
    main(sweep_command(swept, text, n_trials=4, space=WITH_3_HEADS))
    out = capsys.readouterr().out
    assert len(load(swept).trials) == 4
    assert re.search(r"sweep space: \d complete, \d pruned, 1 fail", out)
    assert "trial 1 failed: n_embd=32 is not divisible by n_head=3" in out


def test_a_sweep_prints_a_line_per_trial_and_keeps_each_fits_output_in_the_trials_log(text, tmp_path, capsys):
    queue(tmp_path, GOOD, UNBUILDABLE, HOPELESS)
    main(sweep_command(tmp_path, text, n_trials=3, space=WITH_3_HEADS))
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if re.match(r"trial \d+ +\S+=", line)]  # not the table's
    assert len(lines) == 3
    best = r"   best so far \d\.\d{4} \(trial 0\)"
    assert re.fullmatch(r"trial 0   lr=0.03 n_head=2  val loss \d\.\d{4}  \d+\.\d s" + best, lines[0])
    assert re.fullmatch(r"trial 1   lr=0.01 n_head=3  failed: n_embd=32 is not divisible by n_head=3: .*", lines[1])
    assert re.fullmatch(r"trial 2   lr=1e-05 n_head=2  pruned at step 2  \d+\.\d s" + best, lines[2])
    assert "bpc" not in out and "charlm: trained" not in out and "LightningCLI" not in out + err  # no fit output
    logs = [(tmp_path / f"sweeps/space/trial_{n}/fit.log").read_text() for n in range(3)]
    assert "charlm: trained to step 6" in logs[0] and "charlm: training a GPT" in logs[2]  # each fit's own output
    # the pruning callback went to the fit as an object: no flag for it in the trial's config
    config = yaml.safe_load((tmp_path / "sweeps/space/trial_0/version_0/config.yaml").read_text())
    assert not any("Pruning" in str(c) for c in config["trainer"].get("callbacks") or [])


def test_two_workers_share_one_study_and_finish_its_trials_between_them(text, tmp_path):
    command = [sys.executable, "-m", "charlm", *sweep_command(tmp_path, text, n_trials=4, max_steps=4)]
    workers = [subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for worker in workers:
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err
    trials = load(tmp_path).get_trials()
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == 4  # no more: a surplus trial is at most asked for and given back
    assert len({t.user_attrs["owner"] for t in done}) == 2  # each worker ran some


def first_done(cwd) -> bool:
    # before trial 0 has a folder, the worker may still be creating the study's tables
    return (cwd / "sweeps/space/trial_0").exists() and load(cwd).trials[0].state == TrialState.COMPLETE


def test_a_killed_sweep_continues_where_it_stopped(text, tmp_path, monkeypatch):
    command = [sys.executable, "-m", "charlm", *sweep_command(tmp_path, text, n_trials=3, max_steps=40)]
    worker = subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not first_done(tmp_path):
        assert worker.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    worker.send_signal(signal.SIGKILL)  # in trial 1, or just after
    worker.wait()
    first = load(tmp_path).trials[0]
    monkeypatch.chdir(tmp_path)
    main(sweep_command(tmp_path, text, n_trials=3, max_steps=40))
    trials = load(tmp_path).get_trials()
    assert trials[0].value == first.value  # the finished trial is kept
    counted = [t for t in trials if t.state != TrialState.FAIL or "error" in t.user_attrs]
    assert len(counted) == 3 and all(t.state != TrialState.RUNNING for t in trials)


def test_in_a_shared_storage_a_sweep_fails_the_trials_of_workers_that_are_gone(text, tmp_path, monkeypatch):
    """With --storage: a trial whose worker on this machine is gone, and one with no owner for over a minute (its
    worker was killed between asking for it and naming itself), are failed; one asked for a moment ago, which a
    worker elsewhere may be about to name, is left running."""
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path}/shared.db"
    command = sweep_command(tmp_path, text, n_trials=1)
    command[command.index("--") : command.index("--")] = ["--storage", url]
    main(command)
    study = optuna.load_study(study_name="space", storage=url)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    study.ask().set_user_attr("owner", f"{socket.gethostname()}:{gone.pid}")
    unnamed = study.ask()
    study.ask()  # a moment ago, by a worker that has not named itself yet
    with sqlite3.connect(tmp_path / "shared.db") as db:  # asked for five minutes ago, never named
        db.execute("UPDATE trials SET datetime_start = datetime('now', 'localtime', '-5 minutes') WHERE number = ?",
                   (unnamed.number,))  # fmt: skip
    command[command.index("--n_trials") + 1] = "3"
    main(command)
    states = [t.state for t in optuna.load_study(study_name="space", storage=url).get_trials()]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL, TrialState.RUNNING, TrialState.COMPLETE]


def test_a_bad_space_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "space.yaml").write_text("model.lr: {low: 0.1, high: 0.01}\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--space", "space.yaml"])
    assert str(exit_info.value.code) == (
        "charlm: error: --space space.yaml: model.lr: low and high must be numbers with low <= high, not 0.1 and 0.01"
    )
    (tmp_path / "infinite.yaml").write_text("model.lr: {low: 0.01, high: .inf}\n")
    os.mkfifo(tmp_path / "fifo.yaml")
    cases = {
        "infinite.yaml": "--space infinite.yaml: model.lr: low and high must be numbers with low <= high, not 0.01 and",
        "fifo.yaml": "--space fifo.yaml is a FIFO, not a regular file",
        "/dev/zero": "--space /dev/zero is a device, not a regular file",
    }
    for space, message in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            main(["sweep", "--space", space])
        assert str(exit_info.value.code).startswith(f"charlm: error: {message}")
    assert not (tmp_path / "sweeps").exists()


@pytest.mark.parametrize("ask", ["--help", "--print_config"])
def test_help_among_the_trials_flags_is_refused_before_any_trial(tmp_path, monkeypatch, ask):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "space.yaml").write_text("model.lr: {low: 0.01, high: 0.1}\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--space", "space.yaml", "--", ask])
    assert str(exit_info.value.code) == (
        f"charlm: error: {ask} among the trials' fit flags would print instead of training: run python -m charlm fit "
        f"{ask} on its own, then give the sweep only training flags"
    )
    assert not (tmp_path / "sweeps").exists()


def test_the_sweeps_storage_and_names_are_checked_and_a_users_files_left_alone(text, tmp_path, capsys):
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    command = ["sweep", "--space", "space.yaml", "--n_trials", "1"]
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--study", "../outside"])
    assert "--study ../outside: a study is a folder in sweeps/" in str(exit_info.value.code)
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--show_only", "true"])
    assert (
        str(exit_info.value.code)
        == "charlm: error: --study space: there is no sweeps/space/study.db: run the sweep first"
    )
    assert not (tmp_path / "sweeps").exists() and not (tmp_path.parent / "outside").exists()
    (tmp_path / "sweeps/space").mkdir(parents=True)
    (tmp_path / "sweeps/space/study.db").write_bytes(b"not a database" * 100)
    with pytest.raises(SystemExit) as exit_info:
        main(command)
    assert re.fullmatch(
        r"charlm: error: sweep space: its storage sqlite:///sweeps/space/study.db cannot be used \(.+\): remove or "
        r"repair sweeps/space/study.db",
        str(exit_info.value.code),
    )
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--storage", "nosuchdb://x"])
    assert "its storage nosuchdb://x cannot be used" in str(exit_info.value.code)
    (tmp_path / "sweeps/space/study.db").unlink()
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "sweeps/space/.charlm-lock").unlink()
    (tmp_path / "sweeps/space/.charlm-lock").symlink_to(tmp_path / "notes.txt")
    with pytest.raises(SystemExit) as exit_info:
        main(command)
    assert "sweeps/space/.charlm-lock cannot be opened" in str(exit_info.value.code)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_an_edited_best_yaml_is_kept_and_another_storage_never_shares_trial_folders(text, tmp_path, capsys):
    main(sweep_command(tmp_path, text, n_trials=1))
    best = tmp_path / "sweeps/space/best.yaml"
    best.write_text(best.read_text().replace("lr:", "lr:  # mine\n  lr_note:", 1) + "# edited\n")
    edited = best.read_bytes()
    main(sweep_command(tmp_path, text, n_trials=2))
    assert best.read_bytes() == edited
    assert "sweeps/space/best.yaml was edited, so it is kept as it is" in capsys.readouterr().err
    # the same study name in a new storage numbers its trials from 0 again: trial_0/ is the first study's
    other = sweep_command(tmp_path, text, n_trials=1)
    other[other.index("--") : other.index("--")] = ["--storage", f"sqlite:///{tmp_path}/other.db"]
    before = (tmp_path / "sweeps/space/trial_0/version_0/config.yaml").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main(other)
    assert "sweeps/space/trial_0/ is there already, from another study of this name" in str(exit_info.value.code)
    assert (tmp_path / "sweeps/space/trial_0/version_0/config.yaml").read_bytes() == before


def test_a_sweep_in_which_no_trial_completed_exits_1(text, tmp_path, capsys):
    queue(tmp_path, UNBUILDABLE)
    with pytest.raises(SystemExit) as exit_info:
        main(sweep_command(tmp_path, text, n_trials=1, space=WITH_3_HEADS))
    assert str(exit_info.value.code).startswith("charlm: error: no trial of sweep space completed")


def test_a_space_that_no_longer_matches_the_study_is_one_line(text, tmp_path):
    main(sweep_command(tmp_path, text, n_trials=1))
    changed = SPACE | {"model.lr": {"choices": [0.01, 0.03]}}  # a range before, a list of values now
    with pytest.raises(SystemExit) as exit_info:
        main(sweep_command(tmp_path, text, n_trials=2, space=changed))
    assert str(exit_info.value.code).startswith(f"charlm: error: --space {tmp_path}/space.yaml no longer matches sweep")
    assert str(exit_info.value.code).endswith("restore the space, or pass --study with a new name")


def test_what_is_not_the_storages_fault_is_not_blamed_on_it(text, tmp_path):
    """A seed no sampler takes, a best trial's config edited into no config, a space that gained a flag since the
    study's trials: each says what it is (or is shown), and the database is never said to be the cause."""
    command = sweep_command(tmp_path, text, n_trials=1)
    command[command.index("--seed") + 1] = str(2**70)
    with pytest.raises(SystemExit) as exit_info:
        main(command)
    assert str(exit_info.value.code) == (
        f"charlm: error: --seed {2**70} is outside what Optuna's samplers take, [0, {2**32 - 1}]: pass one inside"
    )
    main(sweep_command(tmp_path, text, n_trials=1))
    wider = SPACE | {"model.beta2": {"low": 0.9, "high": 0.99}}
    main([*sweep_command(tmp_path, text, n_trials=1, space=wider), "--show_only", "true"])  # shown, the flag blank
    saved = tmp_path / "sweeps/space/trial_0/version_0/config.yaml"
    saved.write_text("- not\n- a config\n")
    with pytest.raises(SystemExit) as exit_info:
        main([*sweep_command(tmp_path, text, n_trials=1), "--show_only", "true"])
    assert str(exit_info.value.code).startswith(f"charlm: error: {saved.relative_to(tmp_path)} is not the config a ")
    assert "storage" not in str(exit_info.value.code)


def test_a_database_spoiled_under_a_running_sweep_is_one_line(text, tmp_path):
    spoil = ["--trainer.callbacks+=probes.Spoil", "--trainer.callbacks.init_args.path", "sweeps/space/study.db"]
    with pytest.raises(SystemExit) as exit_info:  # the first trial's fit overwrites the database as it starts
        main([*sweep_command(tmp_path, text, n_trials=2), *spoil])
    assert re.fullmatch(
        r"charlm: error: sweep space: its storage sqlite:///sweeps/space/study.db cannot be used \(.+\): remove or "
        r"repair sweeps/space/study.db",
        str(exit_info.value.code),
    )
