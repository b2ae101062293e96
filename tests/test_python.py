"""`charlm.fit`: the Python entry point runs what `python -m charlm fit` runs, and raises instead of exiting."""

import logging
import os
import signal
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import scalars, tiny

import charlm
from charlm.errors import FlagError, Stopped


class Validations(L.Callback):
    """The steps at which the run validated, and the val loss each time."""

    def __init__(self):
        self.seen: dict[int, float] = {}

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.seen[trainer.global_step] = float(trainer.callback_metrics["val/loss"])


def test_fit_from_python_trains_runs_callback_objects_and_returns_the_trainer(corpus, tmp_path, capsys):
    validations = Validations()
    trainer = charlm.fit(tiny(corpus, max_steps=4), callbacks=[validations])
    assert list(validations.seen) == [2, 4]
    assert trainer.global_step == 4 and float(trainer.callback_metrics["val/loss"]) == validations.seen[4]
    assert (
        Path(trainer.checkpoint_callback.last_model_path) == tmp_path / "checkpoints/gpt-cpu-plays/version_0/last.ckpt"
    )
    logged = scalars(trainer.logger.log_dir)["val/loss"]
    assert [round(v, 5) for _, v in logged] == [round(v, 5) for v in validations.seen.values()]
    assert "charlm: trained to step 4" in capsys.readouterr().out  # the same run the command makes


def test_fit_from_python_raises_the_commands_one_line_errors(corpus, tmp_path):
    with pytest.raises(FlagError, match=r"^charlm fit: error: .*--model.nope"):
        charlm.fit([*tiny(corpus), "--model.nope", "1"])
    with pytest.raises(ValueError, match=r"^--model.lr -1.0 must be > 0$"):
        charlm.fit([*tiny(corpus), "--model.lr", "-1"])
    with pytest.raises(FileNotFoundError, match="no last.ckpt in"):
        charlm.fit([*tiny(corpus), "--ckpt_path", "last"])
    assert not (tmp_path / "checkpoints").exists()


def test_fit_takes_settings_as_mappings_and_leaves_the_process_as_it_found_it(corpus, tmp_path):
    def state():
        return (
            list(warnings.filters),
            {name: logging.getLogger(name).level for name in ("lightning.pytorch", "lightning.fabric")},
            list(logging.getLogger("lightning.pytorch.utilities.rank_zero").filters),
            signal.getsignal(signal.SIGINT),
            signal.getsignal(signal.SIGTERM),
            os.environ.get("PL_GLOBAL_SEED"),
            torch.get_rng_state(),
        )

    before = state()
    trainer = charlm.fit(
        tiny(corpus),
        model={"net": {"n_layer": 2}, "lr": 0.02},
        trainer={"max_steps": 2, "val_check_interval": 1},
        generation={"max_new_tokens": 0},
    )
    assert trainer.global_step == 2 and len(trainer.lightning_module.net.h) == 2
    assert trainer.lightning_module.hparams.lr == 0.02
    after = state()
    assert after[:-1] == before[:-1] and torch.equal(after[-1], before[-1])
    with pytest.raises(ValueError, match=r"^--model.lr -1.0 must be > 0$"):  # refused in the flag's own words
        charlm.fit(tiny(corpus), model={"lr": -1})
    with pytest.raises(FlagError, match=r"--trainer.nope"):
        charlm.fit(tiny(corpus), trainer={"nope": 1})
    assert state()[:-1] == before[:-1]


class Interrupting(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        raise KeyboardInterrupt


def test_a_keyboard_interrupt_inside_the_run_is_stopped_as_a_ctrl_c_is(corpus, tmp_path):
    """Lightning turns it into sys.exit(1); charlm.fit raises what a Ctrl-C raises, and the command exits 130."""
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(Stopped) as stopped:
        charlm.fit(tiny(corpus), callbacks=[Interrupting()])
    assert stopped.value.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) == before  # Lightning's SIG_IGN for a second one is undone
