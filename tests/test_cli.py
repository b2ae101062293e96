"""End to end: `python -m charlm` as a person runs it, in a subprocess, on the real corpus, with a tiny GPT."""

import re
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import ROOT
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from charlm.__main__ import main


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
        "--trainer.enable_progress_bar", "false",
        "--generation.max_new_tokens", "30",
    ]  # fmt: skip


def charlm(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "charlm", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in a TensorBoard log folder, read back with TensorBoard's own reader."""
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    """In-process runs of main(args) must not also see pytest's own command line."""
    monkeypatch.setattr(sys, "argv", ["charlm"])


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A 4-step run from a folder outside the checkout, as a person would start one."""
    cwd = tmp_path_factory.mktemp("run")
    before = sorted(p.relative_to(ROOT) for p in ROOT.rglob("*") if ".git" not in p.parts)
    result = charlm("fit", *tiny(corpus), cwd=cwd)
    assert result.returncode == 0, result.stderr
    after = sorted(p.relative_to(ROOT) for p in ROOT.rglob("*") if ".git" not in p.parts)
    return cwd, result, before, after


def test_fit_writes_checkpoints_logs_and_samples_under_the_working_directory(trained):
    cwd, result, before, after = trained
    assert before == after  # nothing was written into the checkout
    ckpts = cwd / "checkpoints/gpt-cpu"
    assert (ckpts / "last.ckpt").is_file()
    assert len(list(ckpts.glob("step*-val*.ckpt"))) == 1  # the best by val/loss
    assert "--- sample at step 2 ---" in result.stdout and "--- sample at step 4 ---" in result.stdout

    logs = scalars(cwd / "logs/gpt-cpu/version_0")
    assert [step for step, _ in logs["train/loss"]] == [0, 1, 2, 3]
    assert len(logs["val/loss"]) == len(logs["val/bpc"]) == 2
    assert logs["val/bpc"][-1][1] == pytest.approx(logs["val/loss"][-1][1] / 0.6931471805599453)
    assert logs["val/loss"][-1][1] < logs["train/loss"][0][1]  # it learned something in 4 steps
    assert len(logs["train/lr"]) == 4
    assert (cwd / "logs/gpt-cpu/version_0/config.yaml").is_file()


def test_checkpoint_is_self_describing_and_loads_with_weights_only(trained):
    cwd, *_ = trained
    ckpt = torch.load(cwd / "checkpoints/gpt-cpu/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    assert len(ckpt["CharDataModule"]["chars"]) == 65
    net = ckpt["hyper_parameters"]["net"]
    assert net["class_path"] == "charlm.models.GPT"
    assert net["init_args"] | {"vocab_size": 65, "block_size": 32, "n_layer": 1, "n_embd": 32} == net["init_args"]


def test_resume_from_last_continues_the_global_step_and_the_curves(corpus, tmp_path):
    assert charlm("fit", *tiny(corpus, max_steps=2), cwd=tmp_path).returncode == 0
    result = charlm("fit", *tiny(corpus, max_steps=4), "--ckpt_path", "last", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    ckpts = tmp_path / "checkpoints/gpt-cpu"
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 4
    assert not list(ckpts.glob("last-v*.ckpt"))  # the resumed run updates last.ckpt rather than starting a new one
    assert len(list(ckpts.glob("step*-val*.ckpt"))) == 1  # and still keeps one best checkpoint
    resumed = scalars(tmp_path / "logs/gpt-cpu/version_1")
    assert [step for step, _ in resumed["train/loss"]] == [2, 3]


def val_loss_printed(capsys) -> float:
    out = capsys.readouterr().out
    return float(re.search(r"val/loss\s*│\s*([0-9.]+)", out).group(1))


def test_validate_prints_the_same_exact_val_loss_twice(trained, corpus, capsys, monkeypatch):
    cwd, *_ = trained
    monkeypatch.chdir(cwd)
    args = ["validate", *tiny(corpus), "--ckpt_path", str(cwd / "checkpoints/gpt-cpu/last.ckpt")]
    main(args)
    first = val_loss_printed(capsys)
    main(args)
    assert val_loss_printed(capsys) == first
    logged = scalars(cwd / "logs/gpt-cpu/version_0")["val/loss"][-1][1]
    assert first == pytest.approx(logged, abs=1e-5)


def test_resume_from_last_without_a_checkpoint_is_an_error_naming_the_folder(corpus, tmp_path):
    result = charlm("fit", *tiny(corpus), "--ckpt_path", "last", cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        f"charlm: error: --ckpt_path last: no last.ckpt in {tmp_path}/checkpoints/gpt-cpu/: train first, or pass a file"
    )
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--data.path", "missing.txt"], "--data.path missing.txt does not exist"),
        (["--model.net.init_args.n_head", "3"], "n_embd=32 is not divisible by n_head=3"),
        (["--ckpt_path", "nothing.ckpt"], "--ckpt_path nothing.ckpt is not a file"),
    ],
)
def test_bad_input_is_one_line_error_and_non_zero_exit(corpus, tmp_path, monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *tiny(corpus), *flags])
    assert message in str(exit_info.value.code) and "\n" not in str(exit_info.value.code)


def resolved_config(capsys, *args) -> dict:
    with pytest.raises(SystemExit):
        main(["fit", *args, "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


def test_plain_fit_trains_the_cpu_recipe(capsys):
    default = resolved_config(capsys)
    recipe = resolved_config(capsys, "--config", str(ROOT / "configs/gpt-cpu.yaml"))
    # the config names its own log and checkpoint folders; on a GPU the default adds mixed precision
    for config in (default, recipe):
        del config["trainer"]["logger"]["init_args"]["name"], config["checkpoint"]["dirpath"]
        del config["trainer"]["precision"]
    assert default == recipe


@pytest.mark.parametrize("name", ["bigram", "gpt", "gpt-cpu"])
def test_every_config_parses(capsys, name):
    config = resolved_config(capsys, "--config", str(ROOT / f"configs/{name}.yaml"))
    assert config["checkpoint"]["dirpath"] == f"checkpoints/{name}"
    assert config["trainer"]["logger"]["init_args"]["name"] == name
