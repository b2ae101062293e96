"""Crash-safe checkpoints: atomic writes, a fresh last.ckpt at every validation, every N steps and on Ctrl-C or
SIGTERM, and one run at a time per checkpoint folder.

Whatever stops a run, the newest checkpoint on disk is whole, and resuming from it loses only the steps since.
"""

import fcntl
import os
import pickle
import signal
import sys
import zipfile
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

TEMP_PREFIX = ".saving-"  # never matches last*.ckpt, so a save cut short is never picked up by --ckpt_path last


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file in its folder, fsync it, then rename it onto its name.

    A crash, a kill or a full disk during a save leaves the previous file with that name as it was.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f"{TEMP_PREFIX}{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise OSError(
                f"could not save {path} ({e.strerror or e}): the checkpoints already there are intact; "
                "free some disk space, then resume with --ckpt_path last"
            ) from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        folder = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


class ResumableCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that keeps `last.ckpt` fresh enough to resume from after any interruption.

    Beyond ModelCheckpoint (the best checkpoints by `monitor`), `last.ckpt` is written after every validation,
    every `save_last_every_n_steps` optimizer steps and at the last step. On SIGINT (Ctrl-C) or SIGTERM the run
    finishes its current step, writes `last.ckpt` and exits with 128 + the signal number; a second Ctrl-C stops at
    once, still without a half-written file.

    Args:
        save_last_every_n_steps: refresh `last.ckpt` every this many optimizer steps. A save of nanoGPT's CPU-size
            model takes 35 ms (serialize, write, fsync): every 250 steps costs 0.4% of its training time.
        **kwargs: ModelCheckpoint's arguments.
    """

    def __init__(self, save_last_every_n_steps: int = 250, **kwargs):
        super().__init__(**kwargs)
        if save_last_every_n_steps < 1:
            raise ValueError(
                f"--checkpoint.save_last_every_n_steps {save_last_every_n_steps} must be >= 1 (steps between saves)"
            )
        self.save_last_every_n_steps = save_last_every_n_steps
        self.stop_signal: int | None = None
        self.saving_at_batch_start = False
        self.lock = None  # the checkpoint folder's lock (see lock_folder), held by the run that writes here
        self.previous_handlers: dict[int, object] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous_handlers[signum] = signal.signal(signum, self._request_stop)
        if trainer.received_sigterm:  # caught by Lightning's own handler while the run was being set up
            self.stop_signal = signal.SIGTERM

    def _request_stop(self, signum: int, frame) -> None:
        if self.stop_signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now; atomic writes keep the files on disk whole
        self.stop_signal = signum

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        # step global_step is complete, logged and validated here, so a run resumed from this save repeats nothing
        step = trainer.global_step
        stop = self.stop_signal  # a snapshot: the handler may set stop_signal at any moment, also during the reduce
        if trainer.world_size > 1:  # every rank stops after the same step, whichever rank the signal reached
            stop = int(trainer.strategy.reduce(torch.tensor(stop or 0, device=pl_module.device), reduce_op="max"))
        if step > 0 and (stop or step % self.save_last_every_n_steps == 0):
            self.saving_at_batch_start = True
            self._save_last(trainer)
            self.saving_at_batch_start = False
        if stop:
            saved = f"saved {self.last_model_path}; resume with --ckpt_path last" if step > 0 else "nothing to save"
            if trainer.is_global_zero:
                name = signal.Signals(stop).name
                print(f"charlm: {name} received: stopped after step {step}; {saved}", file=sys.stderr, flush=True)
            raise SystemExit(128 + stop)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # Lightning counts the next batch "ready" before on_train_batch_start; resumed from a checkpoint that says so,
        # a run is one batch off (measured: other weights, a skipped log step). Nothing of that batch has run yet.
        if self.saving_at_batch_start:
            loop = checkpoint["loops"]["fit_loop"]
            for counts in (loop["epoch_loop.batch_progress"]["total"], loop["epoch_loop.batch_progress"]["current"]):
                counts["ready"] = counts["completed"]

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_last(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # unlike ModelCheckpoint, refresh last.ckpt after every validation, not only after an improvement
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        if self.save_last:
            self._save_last_checkpoint(trainer, candidates)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        # the curves reach the disk before the checkpoint does: after a kill, the log is never behind the checkpoint
        for logger in trainer.loggers:
            logger.save()
        super()._save_checkpoint(trainer, filepath)

    def _save_last(self, trainer: L.Trainer) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._release()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._release()

    def _release(self) -> None:
        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler)
        self.previous_handlers = {}
        if self.lock is not None:
            self.lock.close()
            self.lock = None


def read_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """Load a checkpoint file with one-line errors; weights_only, so a pickle that would run code is refused."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"{path} is not a valid checkpoint ({reason}): pass a .ckpt file charlm saved") from None


def lock_folder(folder: Path):
    """Hold an exclusive lock on `folder` for as long as the returned file stays open, or fail with a clear error.

    The operating system drops the lock when the process ends, however it ends, so a killed run never blocks the
    next one. Temporary files left by a save that was cut short are removed once the lock is held.
    """
    folder.mkdir(parents=True, exist_ok=True)
    try:  # never through a symlink: the lock file is truncated below, and a link would empty its target
        lock = os.fdopen(os.open(folder / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), "r+")
    except OSError as e:
        raise OSError(
            f"{folder}/.lock cannot be opened ({e.strerror}; a symbolic link is never followed): remove it, charlm "
            "keeps its lock there"
        ) from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        owner = lock.read().strip() or "unknown"
        lock.close()
        raise OSError(
            f"{folder}/ is in use by another run (pid {owner}): wait for it to finish, or pass "
            "--checkpoint.dirpath with another folder"
        ) from None
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    for stale in folder.glob(f"{TEMP_PREFIX}*.tmp"):
        stale.unlink()
    return lock
