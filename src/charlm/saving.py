"""How a fit saves: `ResumableCheckpoint` (last.ckpt fresh enough to resume from, the run's generators, a stop
signal honoured after the current step) and `AtomicCheckpointIO` (no half-written file, ever).

Whatever stops a run, the newest checkpoint on disk is whole, and resuming from it loses only the steps since.
"""

import signal
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from charlm.checkpoints import LAST, read
from charlm.errors import Stopped, stop_now
from charlm.files import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint with `files.atomic_write`: a crash, a kill or a full disk during a save leaves the
    previous file with that name as it was. Read each with `checkpoints.read`; the one a command has already read and
    checked (`hand_over`) is not read again."""

    def __init__(self):
        super().__init__()
        self.handed: tuple[Path, dict] | None = None

    def hand_over(self, path: Path, ckpt: dict) -> None:
        """The checkpoint that Lightning is about to restore, as the command read and checked it."""
        self.handed = (Path(path).absolute(), ckpt)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        if self.handed is not None and self.handed[0] == Path(path).absolute():
            ckpt, self.handed = self.handed[1], None
            return ckpt
        return read(Path(path))

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_write(path) as f:
                torch.save(checkpoint, f)
        except (OSError, RuntimeError) as e:
            # torch's zip writer turns the OSError of a write that failed (a full disk) into a RuntimeError
            error = e.__context__ if isinstance(e, RuntimeError) else e
            if not isinstance(error, OSError):
                raise
            raise OSError(
                f"could not save {path} ({error.strerror or error}): the checkpoints already there are intact; "
                "free some disk space, then resume with --ckpt_path last"
            ) from None


class ResumableCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that keeps `last.ckpt` fresh enough to resume from after any interruption.

    ModelCheckpoint keeps the best checkpoints by `monitor`; `last.ckpt` is this class's, written after every
    validation, every `save_last_every_n_steps` optimizer steps and at the last step. On SIGINT (Ctrl-C) or SIGTERM
    the run finishes its current step, writes `last.ckpt` and exits with 128 + the signal number; a second Ctrl-C
    stops at once, still without a half-written file. (`charlm.cli` locks the folder for the run, and refuses a fresh
    run into one that holds checkpoints.)

    Args:
        save_last_every_n_steps: refresh `last.ckpt` every this many optimizer steps.
        **kwargs: ModelCheckpoint's arguments.
    """

    def __init__(self, save_last_every_n_steps: int = 250, **kwargs):
        super().__init__(**kwargs, save_last=False)
        if save_last_every_n_steps < 1:
            raise ValueError(
                f"--checkpoint.save_last_every_n_steps {save_last_every_n_steps} must be >= 1 (steps between saves)"
            )
        self.save_last_every_n_steps = save_last_every_n_steps
        self.last_saved_step = 0
        self.stop_signal: int | None = None
        self.saving_at_batch_start = False
        self.previous_handlers: dict[int, object] = {}
        self.saved_rng_states: dict | None = None
        self.commands: list[str] = []  # this run's command line (set by charlm.cli), after those of the runs it resumes

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the generators are restored here, after the sanity check and all else that runs between loading and training
        if self.saved_rng_states is not None:
            torch.set_rng_state(self.saved_rng_states["torch"])
            if self.saved_rng_states["cuda"]:
                torch.cuda.set_rng_state_all(self.saved_rng_states["cuda"])
            self.saved_rng_states = None
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous_handlers[signum] = signal.signal(signum, self.request_stop)
        if trainer.received_sigterm:  # caught by Lightning's own handler while the run was being set up
            self.stop_signal = signal.SIGTERM

    def request_stop(self, signum: int, frame) -> None:
        if self.stop_signal == signal.SIGINT and signum == signal.SIGINT:
            stop_now(signum, frame)  # Ctrl-C twice: stop now; atomic writes keep the files on disk whole
        self.stop_signal = signum

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        # step global_step is complete, logged and validated here, so a run resumed from this save repeats nothing
        stop = self.requested_stop(trainer, pl_module)
        if stop or trainer.global_step % self.save_last_every_n_steps == 0:
            self.saving_at_batch_start = True
            self.write_last(trainer)
            self.saving_at_batch_start = False
        if stop:
            self.stop(trainer, stop)

    def requested_stop(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int:
        """The signal that asked the run to stop, or 0; under DDP, any rank's."""
        stop = self.stop_signal or 0  # a snapshot: the handler may set stop_signal at any moment, also during reduce
        if trainer.world_size > 1:  # every rank stops after the same step, whichever rank the signal reached
            stop = int(trainer.strategy.reduce(torch.tensor(stop, device=pl_module.device), reduce_op="max"))
        return stop

    def stop(self, trainer: L.Trainer, signum: int) -> None:
        step = trainer.global_step
        saved = f"saved {self.last_model_path}; resume with --ckpt_path last" if step > 0 else "nothing to save"
        if not trainer.is_global_zero:  # rank zero alone says what happened
            raise SystemExit(128 + signum)
        raise Stopped(signum, f"after step {step}; {saved}")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)  # the best checkpoints
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self.write_last(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self.write_last(trainer)
        # a signal after the last step (in its validation, say) stops the run too: whoever sent it sees it fail
        if stop := self.requested_stop(trainer, pl_module):
            self.stop(trainer, stop)

    def write_last(self, trainer: L.Trainer) -> None:
        """Write last.ckpt, unless it already holds this step (or no step was taken)."""
        if self.last_saved_step != trainer.global_step:
            self.last_model_path = str(Path(self.dirpath) / LAST)
            trainer.save_checkpoint(self.last_model_path, weights_only=False)  # the path is in this state
            self.last_saved_step = trainer.global_step

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # the curves reach the disk before the checkpoint does: after a kill, the log is never behind the checkpoint
        for logger in trainer.loggers:
            logger.save()
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
        checkpoint["rng_states"] = {"torch": torch.get_rng_state(), "cuda": cuda}
        checkpoint["log_version"] = trainer.logger.version if trainer.logger else None
        checkpoint["commands"] = self.commands
        # Lightning counts the next batch "ready" before on_train_batch_start; resumed from a checkpoint that says so,
        # a run is one batch off (measured: other weights, a skipped log step). Nothing of that batch has run yet.
        if self.saving_at_batch_start:
            loop = checkpoint["loops"]["fit_loop"]
            for counts in (loop["epoch_loop.batch_progress"]["total"], loop["epoch_loop.batch_progress"]["current"]):
                counts["ready"] = counts["completed"]

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.saved_rng_states = checkpoint.get("rng_states")
        self.commands = [*checkpoint.get("commands", []), *self.commands]
        self.last_saved_step = checkpoint["global_step"]

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self.release()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self.release()

    def release(self) -> None:
        """Give back the signal handlers."""
        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler)
        self.previous_handlers = {}
