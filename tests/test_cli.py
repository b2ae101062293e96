"""End to end: `python -m charlm` as a person runs it, in a subprocess, on the real corpus, with a tiny GPT."""

import io
import os
import pty
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, charlm, scalars, tiny
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from charlm.__main__ import main


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
    ckpts = cwd / "checkpoints/gpt-cpu-plays/version_0"
    assert (ckpts / "last.ckpt").is_file()
    assert len(list(ckpts.glob("step*-val*.ckpt"))) == 1  # the best by val/loss
    assert "--- sample at step 2 ---" in result.stdout and "--- sample at step 4 ---" in result.stdout

    logs = scalars(cwd / "logs/gpt-cpu-plays/version_0")
    assert [step for step, _ in logs["train/loss"]] == [0, 1, 2, 3]
    assert len(logs["val/loss"]) == len(logs["val/bpc"]) == 2
    assert logs["val/bpc"][-1][1] == pytest.approx(logs["val/loss"][-1][1] / 0.6931471805599453)
    assert logs["val/loss"][-1][1] < logs["train/loss"][0][1]  # it learned something in 4 steps
    assert len(logs["train/lr"]) == 4
    assert (cwd / "logs/gpt-cpu-plays/version_0/config.yaml").is_file()
    assert [step for step, _ in logs["train/tokens_per_sec"]] == [1, 2, 3]  # from the second logged step on
    assert all(rate > 0 for _, rate in logs["train/tokens_per_sec"])
    assert "epoch" not in logs and "hp_metric" not in logs  # no staircase, no -1
    assert [value for _, value in logs["val/best_loss"]] == [
        min(v for _, v in logs["val/loss"][: i + 1]) for i in (0, 1)
    ]


def test_fit_prints_a_line_per_validation_and_a_summary_on_stdout(trained):
    cwd, result, *_ = trained
    logged = scalars(cwd / "logs/gpt-cpu-plays/version_0")["val/loss"]
    lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 2
    for line, (_, val) in zip(lines, logged):
        step, loss, bpc = re.fullmatch(
            r"step (\d)/4: train loss \d\.\d{4}, val loss (\d\.\d{4}) \((\d\.\d{3}) bpc\), 0:\d\d", line
        ).groups()
        assert float(loss) == pytest.approx(val, abs=5e-5) and float(bpc) == pytest.approx(val / 0.693147, abs=5e-4)
    assert [line.split(":")[0] for line in lines] == ["step 2/4", "step 4/4"]
    ckpts = cwd / "checkpoints/gpt-cpu-plays/version_0"
    (best,) = ckpts.glob("step*-val*.ckpt")
    assert result.stdout.splitlines()[-5:] == [
        f"charlm: trained to step 4, val loss {logged[-1][1]:.4f}",
        f"  last    {ckpts}/last.ckpt",
        f"  best    {best} (val loss {min(v for _, v in logged):.4f})",
        "  curves  logs/gpt-cpu-plays/version_0 (tensorboard --logdir logs)",
        f"  sample  python -m charlm generate --ckpt_path {ckpts}",
    ]
    assert "step 4/4" not in result.stderr  # the progress and diagnostics are stderr's, the story stdout's


def test_hparams_are_the_runs_settings_and_its_best_val_loss(trained, corpus):
    cwd, *_ = trained
    events = EventAccumulator(str(cwd / "logs/gpt-cpu-plays/version_0"))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    session = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info.hparams
    settings = {k: v.string_value or v.number_value for k, v in session.items()}
    assert settings | {"net": "GPT", "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32} == settings
    assert settings | {"batch_size": 64, "max_steps": 4, "lr": 0.01, "tokenizer": "chars"} == settings
    assert settings["data"] == str(corpus) and not any(key.startswith("_") for key in settings)
    experiment = HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == ["val/best_loss"]
    assert "custom_scalars__config__" in events.Tags()["tensors"]  # train and val loss in one chart


def test_fit_prints_no_library_noise(trained):
    """Neither torch's deprecation of what Lightning calls, Lightning's advertisement nor its banner lines."""
    _, result, _, _ = trained
    for noise in ("deprecated", "litlogger", "Seed set to", "GPU available", "`Trainer.fit` stopped", "FLOPs"):
        assert noise not in result.stderr


def test_checkpoint_is_self_describing_and_loads_with_weights_only(trained):
    cwd, *_ = trained
    ckpt = torch.load(cwd / "checkpoints/gpt-cpu-plays/version_0/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    assert len(ckpt["CharDataModule"]["chars"]) == 65
    net = ckpt["hyper_parameters"]["net"]
    assert net["class_path"] == "charlm.models.GPT"
    assert net["init_args"] | {"vocab_size": 65, "block_size": 32, "n_layer": 1, "n_embd": 32} == net["init_args"]


def test_resume_from_last_continues_the_global_step_and_the_curves(corpus, tmp_path, capsys):
    main(["fit", *tiny(corpus, max_steps=2)])
    main(["fit", *tiny(corpus, max_steps=4), "--ckpt_path", "last"])
    ckpts = tmp_path / "checkpoints/gpt-cpu-plays/version_0"
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 4
    assert not list(ckpts.glob("last-v*.ckpt"))  # the resumed run updates last.ckpt rather than starting a new one
    assert len(list(ckpts.glob("step*-val*.ckpt"))) == 1  # and still keeps one best checkpoint
    assert [p.name for p in (tmp_path / "logs/gpt-cpu-plays").iterdir()] == ["version_0"]  # the curves go on in place
    assert [step for step, _ in scalars(tmp_path / "logs/gpt-cpu-plays/version_0")["train/loss"]] == [0, 1, 2, 3]
    assert "charlm: resuming with settings other" not in capsys.readouterr().err  # the same settings: nothing to say
    changed = ["--model.lr", "0.005", "--data.batch_size", "16", "--seed_everything", "7"]
    main(["fit", *tiny(corpus, max_steps=6), "--ckpt_path", "last", *changed])
    assert (
        "charlm: resuming with settings other than the checkpoint's: --data.batch_size 16 (was 64), "
        "--seed_everything 7 (was 1337), --model.lr 0.005 (was 0.01); the run goes on, not as it would have gone"
    ) in capsys.readouterr().err


def test_a_resume_on_a_text_edited_since_with_the_same_vocabulary_says_so(corpus, tmp_path, capsys):
    text = tmp_path / "mine.txt"
    text.write_text(corpus.read_text())
    main(["fit", *tiny(corpus, max_steps=2), "--data.path", str(text)])
    main(["fit", *tiny(corpus, max_steps=3), "--data.path", str(text), "--ckpt_path", "last"])
    assert "its text changed" not in capsys.readouterr().err  # the same text: nothing to say
    tokens = len(corpus.read_text()) + 1000
    text.write_text(corpus.read_text() + corpus.read_text()[:1000])  # more of the same characters
    main(["fit", *tiny(corpus, max_steps=4), "--data.path", str(text), "--ckpt_path", "last"])
    assert f"--data.path {text} (its text changed: {tokens:,} tokens, was {tokens - 1000:,})" in capsys.readouterr().err


def test_a_resume_with_other_optimizer_settings_trains_with_them(corpus, tmp_path, capsys):
    """What the resume announces is what the next checkpoint's optimizer and schedule hold (Lightning restores both
    after they are built from the flags)."""
    main(["fit", *tiny(corpus, max_steps=2)])
    changed = {"lr": 0.001, "muon_lr": 0.005, "weight_decay": 0.5, "muon_weight_decay": 0.2, "beta2": 0.9}
    flags = [f for key, value in changed.items() for f in (f"--model.{key}", str(value))]
    main(["fit", *tiny(corpus, max_steps=4), "--ckpt_path", "last", *flags])
    assert "--model.lr 0.001 (was 0.01)" in capsys.readouterr().err
    ckpt = torch.load(tmp_path / "checkpoints/gpt-cpu-plays/version_0/last.ckpt", weights_only=True)
    (state,), (schedule,) = ckpt["optimizer_states"], ckpt["lr_schedulers"]
    adamw, muon = state["adamw"]["param_groups"], state["muon"]["param_groups"]
    assert [g["initial_lr"] for g in [*adamw, *muon]] == schedule["base_lrs"] == [0.001, 0.001, 0.005]
    assert [g["weight_decay"] for g in [*adamw, *muon]] == [0.5, 0.0, 0.2]
    assert all(tuple(g["betas"]) == (0.9, 0.9) for g in adamw)
    factors = {round(g["lr"] / g["initial_lr"], 9) for g in [*adamw, *muon]}
    assert len(factors) == 1 and 0 < factors.pop() <= 1  # every group at the same place in the schedule
    assert {key: ckpt["hyper_parameters"][key] for key in changed} == changed


def test_validate_prints_the_same_exact_val_loss_twice_and_adds_no_run(trained, corpus, capsys, monkeypatch):
    cwd, *_ = trained
    monkeypatch.chdir(cwd)
    main(["validate", *tiny(corpus), "--ckpt_path", "last"])
    first = capsys.readouterr().out
    main(["validate", *tiny(corpus), "--ckpt_path", "last", "--verbose", "true"])
    second = capsys.readouterr().out
    loss = re.fullmatch(
        r"val loss (\d\.\d{4}) \(\d\.\d{3} bpc\) over ([\d,]+) tokens: \S+/gpt-cpu-plays/version_0/last.ckpt, step 4\n",
        first,
    ).group(1)
    assert first in second and "val/loss" in second  # --verbose: Lightning's results table too
    logged = scalars(cwd / "logs/gpt-cpu-plays/version_0")["val/loss"][-1][1]
    assert float(loss) == pytest.approx(logged, abs=5e-5)
    assert [p.name for p in (cwd / "logs/gpt-cpu-plays").iterdir()] == ["version_0"]
    assert "sample at step" not in first


def test_validate_without_a_checkpoint_is_refused(corpus, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", *tiny(corpus)])
    assert exit_info.value.code == (
        "charlm: error: validate scores a trained checkpoint: pass --ckpt_path last, best or a .ckpt file"
    )


def test_two_fresh_runs_started_at_once_in_one_folder_each_get_a_version_and_a_refused_one_leaves_none(
    corpus, tmp_path
):
    command = [sys.executable, "-m", "charlm", "fit", *tiny(corpus)]
    started = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in "ab"]
    errors = [process.communicate(timeout=300)[1].decode() for process in started]
    assert [process.returncode for process in started] == [0, 0], errors
    for top in ("checkpoints", "logs"):
        assert sorted(p.name for p in (tmp_path / top / "gpt-cpu-plays").iterdir()) == ["version_0", "version_1"]
    assert all((tmp_path / f"checkpoints/gpt-cpu-plays/version_{n}/last.ckpt").is_file() for n in (0, 1))
    result = charlm("fit", *tiny(corpus), "--generation.prompt", "ë", cwd=tmp_path)  # refused after its folder is made
    assert result.returncode == 1 and "--generation.prompt has characters ['ë']" in result.stderr
    assert sorted(p.name for p in (tmp_path / "checkpoints/gpt-cpu-plays").iterdir()) == ["version_0", "version_1"]


def test_resume_from_last_without_a_checkpoint_is_an_error_naming_the_folder(corpus, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *tiny(corpus), "--ckpt_path", "last"])
    assert exit_info.value.code == (
        f"charlm: error: --ckpt_path last: no last.ckpt in {tmp_path}/checkpoints/gpt-cpu-plays/: train first, or "
        "pass a file"
    )
    assert not (tmp_path / "logs").exists()


def files_and_contents(folder) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != ".charlm-lock"}


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--data.path", "missing.txt"], "--data.path missing.txt does not exist"),
        (["--data.path", "checkpoints"], "--data.path checkpoints is a folder with no .txt file in it"),
        (["--data.path", "empty.txt"], "--data.path empty.txt is empty"),
        (["--data.path", "latin1.txt"], "--data.path latin1.txt is not UTF-8 (byte offset 3)"),
        (["--data.path", "short.txt"], "the training split has 32 characters, fewer than one window"),
        (["--data.path", "other.txt"], "the checkpoint's vocabulary (65 characters) differs from this text's (14)"),
        (
            ["--model.net.init_args.n_head", "3"],
            "holds a GPT with n_head=2, the config or flags give --model.net.init_args.n_head 3",
        ),
        (["--data.block_size", "0"], "--data.block_size 0 and --data.batch_size 64 must both be >= 1"),
        (["--model.net.init_args.dropout", "1.0"], "dropout=1.0 is outside [0, 1)"),
        (["--model.lr", "0"], "--model.lr 0.0 must be > 0"),
        (["--generation.max_new_tokens", "-1"], "--generation.max_new_tokens -1 is outside [0, inf]"),
        (["--generation.top_k", "0"], "--generation.top_k 0 is outside [1, inf]"),
        (["--generation.top_k", "-5"], "--generation.top_k -5 is outside [1, inf]"),
        (["--generation.top_p", "0"], "--generation.top_p 0.0 is outside (0, 1]"),
        (["--generation.temperature", "-1"], "--generation.temperature -1.0 is outside [0, inf]"),
        (["--generation.seed", "100000000000000000000"], "--generation.seed 100000000000000000000 is outside"),
        (["--model.weight_decay", "-5"], "--model.weight_decay -5.0 must be >= 0"),
        (["--data.train_fraction", "-0.5"], "--data.train_fraction -0.5 must be between 0 and 1"),
        (["--trainer.max_steps", "0"], "--trainer.max_steps 0: training is step-based, set it to >= 1"),
        (["--trainer.val_check_interval", "0"], "--trainer.val_check_interval 0 must be > 0"),
        (["--trainer.accumulate_grad_batches", "0"], "--trainer.accumulate_grad_batches 0 must be >= 1"),
        (["--trainer.log_every_n_steps", "0"], "--trainer.log_every_n_steps 0 must be >= 1"),
        (
            ["--data.path", "no_newline.txt", "--generation.prompt", "\n"],
            "--generation.prompt has characters ['\\n'] that are not among the model's 64: change it, or pass "
            "--generation.unknown skip",
        ),
        pytest.param(
            ["--trainer.accelerator", "cuda"],
            "`CUDAAccelerator` can not run on your system since the accelerator is not available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a GPU"),
        ),
        (["--model.net.init_args.pos_emb", "learned"], "holds a GPT with pos_emb=rope, the config or flags give"),
        (["--ckpt_path", "nothing.ckpt"], "--ckpt_path nothing.ckpt does not exist"),
        (["--ckpt_path", "truncated.ckpt"], "truncated.ckpt is not a valid checkpoint"),
        (["--ckpt_path", "logs/gpt-cpu-plays/version_0/config.yaml"], "config.yaml is not a valid checkpoint"),
        (["--ckpt_path", "empty.txt"], "empty.txt is not a valid checkpoint"),
    ],
)
def test_bad_input_is_one_line_error_and_leaves_the_run_untouched(trained, corpus, monkeypatch, flags, message):
    """Each mistake, made while resuming the trained run: an error line, and every checkpoint and log as it was."""
    cwd, *_ = trained
    monkeypatch.chdir(cwd)
    (cwd / "empty.txt").write_text("")
    (cwd / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    (cwd / "short.txt").write_text("hello world\n" * 3)
    (cwd / "other.txt").write_text("hello world, hello charlm.\n" * 40)
    (cwd / "no_newline.txt").write_text(corpus.read_text().replace("\n", " "))
    data = (cwd / "checkpoints/gpt-cpu-plays/version_0/last.ckpt").read_bytes()
    (cwd / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    before = files_and_contents(cwd / "checkpoints") | files_and_contents(cwd / "logs")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *tiny(corpus), "--ckpt_path", "checkpoints/gpt-cpu-plays/version_0/last.ckpt", *flags])
    error = str(exit_info.value.code)
    assert error.startswith("charlm: error: ") and message in error and "\n" not in error
    assert files_and_contents(cwd / "checkpoints") | files_and_contents(cwd / "logs") == before


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--config", "nothere.yaml"], "File does not exist"),
        (["--trainer.max_stepz", "5"], "unrecognized arguments: --trainer.max_stepz 5"),
        (["--checkpoint.save_last", "false"], "unrecognized arguments: --checkpoint.save_last false"),  # no prefix
        (["--model.lr", "fast"], "Parser key \"model.lr\": Expected a <class 'float'>. Got value: fast"),
        (["--model.net", "charlm.models.RNN"], "module 'charlm.models' has no attribute 'RNN'"),
    ],
)
def test_a_bad_flag_or_config_is_one_line_not_the_usage_of_every_flag(capsys, tmp_path, monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *flags])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1 and message in error
    assert error.startswith("charlm fit: error: ") and error.endswith("(charlm fit --help lists the flags)\n")
    assert list(tmp_path.iterdir()) == []


def test_a_fresh_run_into_a_given_folder_with_checkpoints_is_refused(trained, corpus, monkeypatch):
    cwd, *_ = trained
    monkeypatch.chdir(cwd)
    before = files_and_contents(cwd / "checkpoints")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *tiny(corpus), "--checkpoint.dirpath", "checkpoints/gpt-cpu-plays/version_0"])
    assert str(exit_info.value.code) == (
        f"charlm: error: {cwd}/checkpoints/gpt-cpu-plays/version_0/ already holds checkpoints of an earlier run: "
        "resume it with --ckpt_path last, or pass --checkpoint.dirpath with a new folder"
    )
    assert files_and_contents(cwd / "checkpoints") == before


def test_each_fresh_run_has_folders_of_its_own_and_last_resumes_the_newest_of_its_name(corpus, tiny_text, tmp_path):
    main(["fit", *tiny(corpus, max_steps=2)])
    main(["fit", *tiny(corpus, max_steps=2)])
    main(["fit", *tiny(tiny_text, max_steps=2)])  # another text: another name
    main(["fit", *tiny(corpus, max_steps=4), "--ckpt_path", "last"])
    runs = ["gpt-cpu-plays/version_0", "gpt-cpu-plays/version_1", "gpt-cpu-tiny/version_0"]
    for top in ("checkpoints", "logs"):
        assert sorted(str(p.relative_to(tmp_path / top)) for p in tmp_path.glob(f"{top}/*/version_*")) == runs
    steps = [torch.load(tmp_path / "checkpoints" / run / "last.ckpt", weights_only=True)["global_step"] for run in runs]
    assert steps == [2, 4, 2]
    assert [step for step, _ in scalars(tmp_path / "logs" / runs[1])["val/loss"]] == [1, 3]


def test_generate_says_which_run_last_took_when_there_were_others(corpus, tiny_text, tmp_path, capsys):
    main(["fit", *tiny(corpus, max_steps=2), "--generation.max_new_tokens", "0"])
    main(["generate", "--ckpt_path", "last", "--max_new_tokens", "5"])
    assert "runs under checkpoints/" not in capsys.readouterr().err  # one run: nothing to choose
    main(["fit", *tiny(tiny_text, max_steps=2), "--generation.max_new_tokens", "0"])
    main(["generate", "--ckpt_path", "last", "--max_new_tokens", "5"])
    newest = Path("checkpoints/gpt-cpu-tiny/version_0/last.ckpt")
    assert f"charlm: --ckpt_path last is {newest}, of the newest of the 2 runs under checkpoints/" in (
        capsys.readouterr().err
    )


def resolved_config(capsys, *args) -> dict:
    with pytest.raises(SystemExit):
        main(["fit", *args, "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


def test_help_lists_every_command_and_an_unknown_one_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    usage = capsys.readouterr().out
    commands = ("fit", "validate", "test", "generate", "attention", "export", "data", "serve", "sweep")
    assert all(f"\n  {command} " in usage for command in commands)
    with pytest.raises(SystemExit) as exit_info:
        main([])  # no command: the same text, as an error
    assert exit_info.value.code == 2 and capsys.readouterr().err == usage
    with pytest.raises(SystemExit) as exit_info:
        main(["train"])
    assert exit_info.value.code == (
        "charlm: error: 'train' is not a command: use fit, validate, test, generate, attention, export, data, serve or "
        "sweep"
    )


def test_help_and_a_commands_help_answer_without_importing_torch_or_lightning():
    code = """import sys
from charlm.__main__ import main
for argv in (["--help"], *([name, "--help"] for name in ("generate", "attention", "export", "serve")), ["train"]):
    try:
        main(argv)
    except SystemExit:
        pass
print([name for name in ("torch", "lightning") if name in sys.modules])
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.splitlines()[-1] == "[]", result.stderr
    assert all(f"usage: charlm {name}" in result.stdout for name in ("generate", "attention", "export", "serve"))


def test_plain_fit_trains_the_cpu_recipe(capsys):
    default = resolved_config(capsys)
    recipe = resolved_config(capsys, "--config", str(ROOT / "configs/gpt-cpu.yaml"))
    assert default == recipe


def test_a_config_that_is_a_fifo_or_an_alias_bomb_is_one_line_before_anything_reads_it(tmp_path, monkeypatch):
    """jsonargparse would wait on a FIFO for a writer, and expand nested aliases ("billion laughs") for minutes."""
    monkeypatch.chdir(tmp_path)
    os.mkfifo("fifo.yaml")
    bomb, previous = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n', "a"
    for name in "bcdefghi":
        bomb += f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]\n"
        previous = name
    (tmp_path / "bomb.yaml").write_text(bomb)
    (tmp_path / "loop.yaml").write_text("model: &m {net: [*m]}\n")
    cases = {
        ("--config", "fifo.yaml"): "--config fifo.yaml is a FIFO, not a regular file",
        ("--config=bomb.yaml",): "--config bomb.yaml: its aliases expand it to more than 100,000 values",
        ("--model", "loop.yaml"): "--model loop.yaml: an alias names a node it is inside of",
    }
    for flags, message in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", *flags])
        assert str(exit_info.value.code).startswith(f"charlm: error: {message}")


def test_fit_help_says_which_configs_are_read_in_what_order_and_a_config_without_an_optimizer_gets_muon(
    capsys, tmp_path
):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the classes' defaults, the recipe (" in text and "each --config in the order given, then the flags" in text
    (tmp_path / "mine.yaml").write_text("data:\n  batch_size: 16\n")
    config = resolved_config(capsys, "--config", str(tmp_path / "mine.yaml"))
    assert config["model"]["optimizer"] == "muon" and config["data"]["batch_size"] == 16


@pytest.mark.parametrize("name", sorted(path.stem for path in (ROOT / "configs").glob("*.yaml")))
def test_every_config_parses_and_none_pins_mixed_precision(capsys, name):
    config = resolved_config(capsys, "--config", str(ROOT / f"configs/{name}.yaml"))
    # the run's folders are named when it starts: logs/<name>/version_N and checkpoints/<name>/version_N
    assert config["checkpoint"]["dirpath"] is None and config["trainer"]["logger"]["init_args"]["name"] is None
    # a pinned bf16-mixed made gpt.yaml 22x slower on the 2-core CPU; null: the run picks it for its device
    assert config["trainer"]["precision"] in (None, "32-true")


def test_the_minute_recipe_is_the_default_model_with_its_own_head_and_schedule(capsys):
    """configs/gpt-cpu-minute.yaml holds only what differs: the rest is the default recipe's, read first."""
    default = resolved_config(capsys)
    minute = resolved_config(capsys, "--config", str(ROOT / "configs/gpt-cpu-minute.yaml"))
    untied = default["model"]["net"]["init_args"] | {"tie_embeddings": False}  # what wins at its length
    assert minute["model"]["net"]["init_args"] == untied and minute["model"]["optimizer"] == "muon"
    assert (minute["data"]["block_size"], minute["data"]["batch_size"], minute["trainer"]["max_steps"]) == (
        128,
        16,
        2400,
    )


def test_the_run_records_the_precision_it_chose_for_its_device(trained):
    cwd = trained[0]
    config = yaml.safe_load((cwd / "logs/gpt-cpu-plays/version_0/config.yaml").read_text())
    expected = "32-true"
    if torch.cuda.is_available():
        expected = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    assert config["trainer"]["precision"] == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU that the run is told not to use")
def test_a_cpu_run_on_a_gpu_machine_trains_in_float32(corpus, tmp_path):
    result = charlm("fit", *tiny(corpus, max_steps=1), "--trainer.accelerator", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load((tmp_path / "logs/gpt-cpu-plays/version_0/config.yaml").read_text())
    assert config["trainer"]["precision"] == "32-true"


def test_fit_logs_the_picture_that_the_attention_command_draws(trained, corpus):
    cwd, *_ = trained
    events = EventAccumulator(str(cwd / "logs/gpt-cpu-plays/version_0"), size_guidance={"images": 0})
    events.Reload()
    logged = events.Images("val/attention")
    assert [image.step for image in logged] == [2, 4]  # at each validation
    text = corpus.read_text()
    val_start = text[int(0.9 * len(text)) :][:64]  # the default text: the start of the validation split
    result = charlm("attention", "--ckpt_path", "last", "--prompt", val_start, "--out", "picture.png", cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "charlm: wrote picture.png: 1 x 2 panels (layers x heads)",
        "charlm: the text is longer than a picture fits: showing the first 32 of its 64 characters",  # block_size 32
    ]
    # the final checkpoint's picture is the one logged at the last step, pixel for pixel
    drawn = np.asarray(Image.open(cwd / "picture.png"))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(logged[-1].encoded_image_string))), drawn)
    assert drawn.shape[0] > 12 * 32 and drawn.shape[1] > 2 * 12 * 32  # 32 characters of 12 pixels, 2 heads wide


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--out", "picture.jpg"], "--out picture.jpg: the picture is a PNG: give a file name ending in .png"),
        (["--out", "no/such/picture.png"], "--out no/such/picture.png: the folder no/such does not exist"),
        (["--prompt", "Zoë"], "--prompt has characters ['ë'] that are not among the model's 65"),
        (["--ckpt_path", "nowhere.ckpt"], "--ckpt_path nowhere.ckpt does not exist"),
        (["--out", "folder.png"], "--out folder.png is a folder: give a file name ending in .png"),
    ],
)
def test_attention_bad_input_is_one_line_error_and_keeps_the_old_picture(trained, monkeypatch, flags, message):
    cwd, *_ = trained
    monkeypatch.chdir(cwd)
    (cwd / "old.png").write_bytes(b"an earlier picture")
    (cwd / "folder.png").mkdir(exist_ok=True)
    with pytest.raises(SystemExit) as exit_info:
        main(["attention", "--ckpt_path", "last", "--prompt", "ROMEO:", "--out", "old.png", *flags])
    assert message in str(exit_info.value.code) and "\n" not in str(exit_info.value.code)
    assert (cwd / "old.png").read_bytes() == b"an earlier picture"
    assert not list(cwd.glob(".saving-*")) and not list((cwd / "folder.png").iterdir())


def test_generate_streams_text_from_the_last_checkpoint_to_stdout_only(trained, capsys, monkeypatch):
    cwd, *_ = trained
    monkeypatch.chdir(cwd)
    args = ["generate", "--ckpt_path", "last", "--prompt", "ROMEO:", "--max_new_tokens", "50"]
    main(args)
    out, err = capsys.readouterr()
    assert out.startswith("ROMEO:") and len(out) == len("ROMEO:") + 50 + 1
    assert "checkpoints/gpt-cpu-plays/version_0/last.ckpt" in err  # diagnostics go to stderr
    main(args)
    assert capsys.readouterr().out == out  # same seed, same text


def test_generate_separates_samples_and_honours_the_seed(trained, capsys, monkeypatch):
    cwd, *_ = trained
    monkeypatch.chdir(cwd)
    args = [
        "generate",
        "--ckpt_path",
        "checkpoints/gpt-cpu-plays/version_0",
        "--max_new_tokens",
        "20",
        "--num_samples",
        "2",
    ]
    main([*args, "--seed", "1"])
    first = capsys.readouterr().out
    assert first.startswith("===== sample 1 of 2 =====\n\n") and "\n===== sample 2 of 2 =====\n\n" in first
    main([*args, "--seed", "2"])
    assert capsys.readouterr().out != first


def test_validate_and_generate_find_best_the_lowest_val_loss(trained, corpus, tmp_path, capsys, monkeypatch):
    cwd, *_ = trained
    shutil.copytree(cwd / "checkpoints", tmp_path / "checkpoints")  # moved: last.ckpt names the best by its old path
    monkeypatch.chdir(tmp_path)
    (best,) = Path("checkpoints/gpt-cpu-plays/version_0").glob("step*-val*.ckpt")
    main(["validate", *tiny(corpus), "--ckpt_path", "best"])
    loss = re.match(r"val loss ([\d.]+) ", capsys.readouterr().out).group(1)
    assert float(loss) == pytest.approx(float(best.stem.split("-val")[1]), abs=1e-4)
    main(["generate", "--ckpt_path", "best", "--max_new_tokens", "5"])
    assert f"charlm: sampling from {best} on cpu" in capsys.readouterr().err


def test_validate_best_and_a_resume_read_the_checkpoint_file_once(trained, corpus, tmp_path, capsys, monkeypatch):
    """The file is read and checked once, and what Lightning restores is what was checked (not read again)."""
    cwd, *_ = trained
    shutil.copytree(cwd / "checkpoints", tmp_path / "checkpoints")
    monkeypatch.chdir(tmp_path)
    folder = Path("checkpoints/gpt-cpu-plays/version_0").resolve()
    (best,) = folder.glob("step*-val*.ckpt")
    reads, load = [], torch.load

    def counted(f, *args, **kwargs):
        reads.append(Path(getattr(f, "name", f)).resolve())
        return load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counted)
    main(["validate", *tiny(corpus), "--ckpt_path", "best"])
    assert reads.count(best) == 1 and capsys.readouterr().out.startswith("val loss ")
    reads.clear()
    main(["fit", *tiny(corpus, max_steps=6), "--ckpt_path", "last"])
    assert reads.count(folder / "last.ckpt") == 1 and load(folder / "last.ckpt", weights_only=True)["global_step"] == 6


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--ckpt_path", "nowhere.ckpt"], "--ckpt_path nowhere.ckpt does not exist"),
        (["--ckpt_path", "logs"], "no last.ckpt in"),
        (["--ckpt_path", "logs/gpt-cpu-plays/version_0/config.yaml"], "is not a valid checkpoint"),
        (["--ckpt_path", "truncated.ckpt"], "truncated.ckpt is not a valid checkpoint"),
        (["--ckpt_path", "last", "--prompt", "Zoë & {x}"], "['{', '}', 'ë'] that are not among the model's 65"),
        (["--ckpt_path", "last", "--prompt_file", "nothere.txt"], "--prompt_file nothere.txt does not exist"),
        (
            ["--ckpt_path", "last", "--prompt_file", "checkpoints"],
            "--prompt_file checkpoints is a folder, not a regular file",
        ),
        (["--ckpt_path", "last", "--prompt_file", "truncated.ckpt"], "--prompt_file truncated.ckpt is not UTF-8"),
        (["--ckpt_path", "last", "--prompt_file", "fifo"], "--prompt_file fifo is a FIFO, not a regular file"),
        (["--ckpt_path", "last", "--prompt_file", "/dev/zero"], "--prompt_file /dev/zero is a device"),
        (["--ckpt_path", "last", "--prompt_file", "huge.txt"], "--prompt_file huge.txt holds 1,048,577 bytes, more"),
    ],
)
def test_generate_bad_input_is_one_line_error(trained, tmp_path, monkeypatch, flags, message):
    cwd, *_ = trained
    monkeypatch.chdir(cwd)
    if not (cwd / "fifo").exists():
        os.mkfifo(cwd / "fifo")  # read, it would block forever
    data = (cwd / "checkpoints/gpt-cpu-plays/version_0/last.ckpt").read_bytes()
    (cwd / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (cwd / "huge.txt").write_text("a" * (2**20 + 1))
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", *flags])
    assert message in str(exit_info.value.code) and "\n" not in str(exit_info.value.code)


def test_generate_can_skip_unknown_prompt_characters(trained, capsys, monkeypatch):
    cwd, *_ = trained
    monkeypatch.chdir(cwd)
    main(["generate", "--ckpt_path", "last", "--prompt", "Zoë", "--unknown", "skip", "--max_new_tokens", "5"])
    assert capsys.readouterr().out.startswith("Zo")


def test_generate_last_without_runs_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--ckpt_path", "last"])
    assert (
        str(exit_info.value.code)
        == f"charlm: error: --ckpt_path last: no last.ckpt in {tmp_path}/checkpoints/: train first, or pass a file"
    )


@pytest.mark.parametrize(
    "flag, value, refusal",
    [
        ("--temperature", "-0.1", "--temperature -0.1 is outside [0, inf]"),
        ("--top_k", "0", "--top_k 0 is outside [1, inf]"),
        ("--top_p", "0", "--top_p 0.0 is outside (0, 1]"),
        ("--top_p", "1.5", "--top_p 1.5 is outside (0, 1]"),
        ("--max_new_tokens", "-1", "--max_new_tokens -1 is outside [0, inf]"),
        ("--seed", str(2**64), f"--seed {2**64} is outside [-9223372036854775808, 18446744073709551615]"),
    ],
)
def test_generate_refuses_an_out_of_range_setting_before_reading_the_checkpoint(flag, value, refusal):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--ckpt_path", "does-not-matter.ckpt", flag, value])
    assert exit_info.value.code == f"charlm: error: {refusal}"


def test_generate_rejects_no_samples_at_parse_time(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--ckpt_path", "does-not-matter.ckpt", "--num_samples", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'Parser key "num_samples": ' in err and "does not conform to restriction v>0" in err


def test_a_checkpoint_whose_pickle_would_run_code_is_refused_and_the_code_does_not_run(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"state_dict": Exploit()}, tmp_path / "evil.ckpt")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--ckpt_path", "evil.ckpt"])
    assert "evil.ckpt is not a valid checkpoint" in str(exit_info.value.code)
    assert not marker.exists()


def test_generate_from_a_bigram_checkpoint(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    steps = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false"]
    main(["fit", "--config", str(ROOT / "configs/bigram.yaml"), "--data.path", str(corpus), *steps])
    capsys.readouterr()
    main(["generate", "--ckpt_path", "checkpoints/bigram-plays", "--prompt", "KING", "--max_new_tokens", "30"])
    out = capsys.readouterr().out
    assert out.startswith("KING") and len(out) == 4 + 30 + 1
    with pytest.raises(SystemExit) as exit_info:
        main(["attention", "--ckpt_path", "last", "--prompt", "KING"])
    assert str(exit_info.value.code) == (
        "charlm: error: --ckpt_path checkpoints/bigram-plays/version_0/last.ckpt holds a Bigram, which has no "
        "attention: pass a GPT's"
    )
    assert not (tmp_path / "attention.png").exists()


def test_a_compiled_run_saves_checkpoints_that_load_without_compile(corpus, tmp_path):
    args = [*tiny(corpus, max_steps=2), "--trainer.limit_val_batches", "2", "--generation.max_new_tokens", "0"]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    result = charlm("fit", *args, "--model.compile", "true", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert any((tmp_path / "inductor").rglob("*.py"))  # torch.compile generated code: it did compile
    assert "--- sample" not in result.stdout  # --generation.max_new_tokens 0 turns the samples off
    compiled = scalars(tmp_path / "logs/gpt-cpu-plays/version_0")["val/loss"][-1][1]

    result = charlm("validate", *args, "--ckpt_path", "last", cwd=tmp_path)  # eager
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.split()[2]) == pytest.approx(compiled, abs=1e-4)


def test_a_fit_into_a_file_prints_plain_progress_lines_on_stderr(corpus, capsys):
    steps = ["--trainer.max_steps", "100", "--trainer.val_check_interval", "100", "--generation.max_new_tokens", "0"]
    main(["fit", *tiny(corpus), *steps, "--trainer.enable_progress_bar", "true"])  # in-process: not a terminal
    out, err = capsys.readouterr()
    assert re.search(r"\nstep 100/100  train \d\.\d{3}  tokens/s [\d,]+  eta 0:00\n", err)
    assert "\x1b[" not in out + err  # no bar
    assert [line for line in out.splitlines() if line.startswith("step")][0].startswith("step 100/100: ")


def test_a_fit_in_a_terminal_draws_the_rich_bar_counting_steps(corpus, tmp_path):
    primary, secondary = pty.openpty()
    command = [sys.executable, "-m", "charlm", "fit", *tiny(corpus), "--trainer.enable_progress_bar", "true"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=secondary, stderr=secondary)
    os.close(secondary)
    screen = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the terminal closed: the run ended
            break
        if not chunk:
            break
        screen += chunk
    assert process.wait(timeout=300) == 0
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", screen.decode())
    assert re.search(r"step ━+ 4/4 0:00:\d\d eta 0:00:00 train \d\.\d{3}  val \d\.\d{3}  tokens/s [\d,]+", text)
    assert "Epoch" not in text and "v_num" not in text
    assert re.search(r"step 4/4: train loss \d\.\d{4}, val loss", text)  # stdout, printed above the bar


def test_no_command_overwrites_a_users_file_at_a_name_charlm_writes(trained, corpus, tmp_path, monkeypatch, capsys):
    """config.yaml and attention.png in the working folder, and a link at an explicit --out: left as they were."""
    cwd, *_ = trained
    monkeypatch.chdir(tmp_path)
    shutil.copytree(cwd / "checkpoints", tmp_path / "checkpoints")
    (tmp_path / "config.yaml").write_text("my own settings\n")
    (tmp_path / "attention.png").write_text("my own picture\n")
    (tmp_path / "target.png").write_text("a link points here\n")
    (tmp_path / "linked.png").symlink_to(tmp_path / "target.png")
    ckpt = ["--ckpt_path", "checkpoints/gpt-cpu-plays/version_0/last.ckpt"]
    main(["validate", *tiny(corpus), *ckpt])
    main(["test", *tiny(corpus), *ckpt])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/.lock").write_text("my lock\n")  # names a user may have there: not charlm's own
    (tmp_path / "mine/.saving-notes").write_text("my notes\n")
    main(["fit", *tiny(corpus, max_steps=2), "--trainer.logger", "false", "--checkpoint.dirpath", "mine"])
    assert (tmp_path / "mine/.lock").read_text() == "my lock\n"
    assert (tmp_path / "mine/.saving-notes").read_text() == "my notes\n"
    with pytest.raises(SystemExit) as exit_info:
        main(["attention", *ckpt, "--prompt", "ROMEO:"])
    assert str(exit_info.value.code) == (
        "charlm: error: attention.png is there and is not a picture charlm drew: pass --out with a new name"
    )
    main(["attention", *ckpt, "--prompt", "ROMEO:", "--out", "linked.png"])  # named: the link is replaced
    assert (tmp_path / "config.yaml").read_text() == "my own settings\n"
    assert (tmp_path / "attention.png").read_text() == "my own picture\n"
    assert (tmp_path / "target.png").read_text() == "a link points here\n" and not (
        tmp_path / "linked.png"
    ).is_symlink()
    (tmp_path / "attention.png").unlink()
    main(["attention", *ckpt, "--prompt", "ROMEO:"])
    main(["attention", *ckpt, "--prompt", "KING"])  # charlm's own picture at the default name: replaced
    assert not list(tmp_path.glob(".saving-*"))


def test_an_explicit_log_version_that_holds_a_run_is_refused_before_anything_is_written(trained, corpus, monkeypatch):
    cwd, *_ = trained
    monkeypatch.chdir(cwd)
    before = files_and_contents(cwd / "logs")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *tiny(corpus), "--trainer.logger.init_args.version", "0", "--checkpoint.dirpath", "elsewhere"])
    assert "--trainer.logger.init_args.version 0: logs/gpt-cpu-plays/version_0/ holds the curves of an earlier run" in (
        str(exit_info.value.code)
    )
    assert files_and_contents(cwd / "logs") == before and not (cwd / "elsewhere").exists()


def test_a_text_without_a_newline_trains_with_the_default_prompt_and_block_size_1(tmp_path, monkeypatch, capsys):
    (tmp_path / "one_line.txt").write_text("the quick brown fox jumps over the lazy dog " * 200)
    flags = ["--data.path", "one_line.txt", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"]
    main(["fit", *flags, "--data.val_tokens", "200", "--generation.max_new_tokens", "80"])
    main(["fit", *flags, "--data.block_size", "1", "--generation.max_new_tokens", "80"])  # samples past its context
    out = capsys.readouterr().out
    assert out.count("--- sample at step 2 ---\n ") == 2  # the first character of the vocabulary: a space


def test_a_tiny_temperature_is_greedy_and_a_batch_beyond_memory_is_one_line(trained, corpus, monkeypatch, capsys):
    cwd, *_ = trained
    monkeypatch.chdir(cwd)
    sample = ["generate", "--ckpt_path", "last", "--prompt", "ROMEO:", "--max_new_tokens", "40", "--temperature"]
    main([*sample, "1e-50"])  # every logit but the largest divided into -inf: no NaN from inf - inf
    tiny_temperature = capsys.readouterr().out
    main([*sample, "0"])
    assert tiny_temperature == capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *tiny(corpus), "--data.batch_size", str(10**13), "--checkpoint.dirpath", "huge"])
    assert str(exit_info.value.code).startswith("charlm: error: out of memory (") and "--data.batch_size" in str(
        exit_info.value.code
    )
