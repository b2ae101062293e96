"""charlm's checkpoints: what they hold, which file --ckpt_path names, how they are written, read and checked.

A checkpoint is Lightning's dict (weights under `state_dict`, optimizer, loops, callback states) plus:
- `hyper_parameters["net"]`: the net as `{"class_path", "init_args"}`, plain values, so it loads with weights_only;
- `CharDataModule`: the tokenizer (the DataModule's state_dict), so a checkpoint alone can generate text;
- `rng_states`: the torch and CUDA generators, so dropout after a resume draws what the run would have drawn;
- `log_version`: the TensorBoard version folder the run logged into, where a resumed run logs on.

`--ckpt_path` means one thing in every command (`resolve`): a file is that file; a folder is its `last.ckpt`, or
else the newest `last.ckpt` one folder down; `last` is the checkpoint folder taken that way (`--checkpoint.dirpath`
for fit, validate and test, `checkpoints/` for generate and attention); `best` is the checkpoint with the lowest
val/loss that the `last.ckpt` so found names, in that file's folder.

Whatever stops a run, the newest checkpoint on disk is whole, and resuming from it loses only the steps since.
"""

import fcntl
import os
import pickle
import signal
import zipfile
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from rich.console import Console
from rich.text import Text

from charlm.models import GPT, Bigram, Net
from charlm.tokenizers import Tokenizer, tokenizer_from_state

LAST = "last.ckpt"
TEMP_PREFIX = ".saving-"  # never a .ckpt name, so a save cut short is never picked up by --ckpt_path
DATA = "CharDataModule"  # where Lightning keeps the DataModule's state_dict: its class name
NETS = {f"{cls.__module__}.{cls.__name__}": cls for cls in (GPT, Bigram)}  # the only classes a checkpoint may name


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

    ModelCheckpoint keeps the best checkpoints by `monitor`; `last.ckpt` is this class's, written after every
    validation, every `save_last_every_n_steps` optimizer steps and at the last step. On SIGINT (Ctrl-C) or SIGTERM
    the run finishes its current step, writes `last.ckpt` and exits with 128 + the signal number; a second Ctrl-C
    stops at once, still without a half-written file. One run at a time writes into a folder (`lock_folder`), and a
    fresh run into a folder that holds checkpoints is refused.

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
        self.lock = None  # the checkpoint folder's lock, held by the run that writes here
        self.previous_handlers: dict[int, object] = {}
        self.saved_rng_states: dict | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and trainer.is_global_zero:
            self.lock = lock_folder(Path(self.dirpath))  # released when the run ends, however it ends

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # here trainer.ckpt_path says whether this run resumes: it is set when the checkpoint is restored, after setup
        folder = Path(self.dirpath)
        if trainer.ckpt_path is None and list(folder.glob("*.ckpt")):
            raise FileExistsError(
                f"{folder.resolve()}/ already holds checkpoints of an earlier run: resume it with --ckpt_path last, "
                "or pass --checkpoint.dirpath with a new folder"
            )

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
            raise KeyboardInterrupt  # Ctrl-C twice: stop now; atomic writes keep the files on disk whole
        self.stop_signal = signum

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        # step global_step is complete, logged and validated here, so a run resumed from this save repeats nothing
        step = trainer.global_step
        stop = self.stop_signal  # a snapshot: the handler may set stop_signal at any moment, also during the reduce
        if trainer.world_size > 1:  # every rank stops after the same step, whichever rank the signal reached
            stop = int(trainer.strategy.reduce(torch.tensor(stop or 0, device=pl_module.device), reduce_op="max"))
        if stop or step % self.save_last_every_n_steps == 0:
            self.saving_at_batch_start = True
            self.write_last(trainer)
            self.saving_at_batch_start = False
        if stop:
            saved = f"saved {self.last_model_path}; resume with --ckpt_path last" if step > 0 else "nothing to save"
            if trainer.is_global_zero:
                stopped = f"{signal.Signals(stop).name} received: stopped after step {step}"
                Console(stderr=True, soft_wrap=True).print(Text.assemble("charlm: ", (stopped, "bold"), f"; {saved}"))
            raise SystemExit(128 + stop)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)  # the best checkpoints
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self.write_last(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self.write_last(trainer)

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
        # Lightning counts the next batch "ready" before on_train_batch_start; resumed from a checkpoint that says so,
        # a run is one batch off (measured: other weights, a skipped log step). Nothing of that batch has run yet.
        if self.saving_at_batch_start:
            loop = checkpoint["loops"]["fit_loop"]
            for counts in (loop["epoch_loop.batch_progress"]["total"], loop["epoch_loop.batch_progress"]["current"]):
                counts["ready"] = counts["completed"]

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.saved_rng_states = checkpoint.get("rng_states")
        self.last_saved_step = checkpoint["global_step"]

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self.release()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self.release()

    def release(self) -> None:
        """Give back the signal handlers and the folder's lock."""
        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler)
        self.previous_handlers = {}
        if self.lock is not None:
            self.lock.close()
            self.lock = None


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


def resolve(ckpt_path: str, folder: Path) -> Path:
    """The checkpoint file that --ckpt_path names; `folder` is the one that `last` and `best` look in."""
    if ckpt_path not in ("last", "best"):
        folder = Path(ckpt_path)
        if folder.is_file():
            return folder
        if not folder.is_dir():
            raise FileNotFoundError(
                f"--ckpt_path {ckpt_path} does not exist: pass a .ckpt file, a folder, last or best"
            )
    last = folder / LAST
    if not last.is_file():
        below = sorted(folder.glob(f"*/{LAST}"), key=lambda p: p.stat().st_mtime)
        if not below:
            raise FileNotFoundError(
                f"--ckpt_path {ckpt_path}: no {LAST} in {folder.resolve()}/: train first, or pass a file"
            )
        last = below[-1]
    return best(last) if ckpt_path == "best" else last


def best(last: Path) -> Path:
    """The checkpoint with the lowest val/loss that a last.ckpt names, in the last.ckpt's folder (moved or not)."""
    states = read(last).get("callbacks", {})
    names = [Path(state["best_model_path"]).name for state in states.values() if state.get("best_model_path")]
    if not names or not (last.parent / names[0]).is_file():
        raise FileNotFoundError(f"--ckpt_path best: {last} names no best checkpoint that exists: pass a file")
    return last.parent / names[0]


def read(path: Path, device: torch.device | str = "cpu") -> dict:
    """A charlm checkpoint, with one-line errors; weights_only, so a pickle that would run code is refused."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"{path} is not a valid checkpoint ({reason}): pass a .ckpt file charlm saved") from None
    try:
        if not isinstance(ckpt["state_dict"], dict) or ckpt["hyper_parameters"]["net"]["class_path"] not in NETS:
            raise KeyError("net")
        ckpt[DATA]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a charlm checkpoint (no {e}): pass a .ckpt file charlm saved") from None
    return ckpt


def check_fits(ckpt: dict, path: Path, model: L.LightningModule, datamodule: L.LightningDataModule) -> None:
    """Fail before any work if a checkpoint's vocabulary or weight shapes differ from the configured run's."""
    datamodule.load_state_dict(ckpt[DATA])  # the same tokenizer and vocabulary, or an error that says which
    saved, expected = ckpt["state_dict"], model.state_dict()
    for name in sorted(expected.keys() | saved.keys()):
        if name not in saved or name not in expected or saved[name].shape != expected[name].shape:
            there = list(saved[name].shape) if name in saved else "absent"
            here = list(expected[name].shape) if name in expected else "absent"
            raise ValueError(
                f"--ckpt_path {path} does not fit this model: {name} is {there} in the checkpoint and {here} in "
                "the config: use the config and flags it was trained with"
            )


def resume_logging(logger: dict | None, ckpt: dict) -> None:
    """Point a fit's TensorBoardLogger config at the folder of the run a checkpoint resumes, from its step:
    purge_step hides what that run logged after the checkpoint, so every step appears once."""
    if not logger or logger.get("class_path") != "lightning.pytorch.loggers.TensorBoardLogger":
        return
    version, init = ckpt.get("log_version"), logger["init_args"]
    folder = Path(init["save_dir"]) / (init.get("name") or "") / f"version_{version}"
    if init.get("version") is None and isinstance(version, int) and version >= 0 and folder.is_dir():
        init["version"], init["purge_step"] = version, int(ckpt.get("global_step", 0))


def load_net(path: Path, device: torch.device | str = "cpu") -> tuple[Net, Tokenizer]:
    """The net (in eval mode) and the tokenizer stored in a charlm checkpoint; nothing else is needed."""
    ckpt = read(path, device)
    try:
        tokenizer = tokenizer_from_state(ckpt[DATA])
    except ValueError as e:
        raise ValueError(f"{path} is not a charlm checkpoint ({e}): pass a .ckpt file charlm saved") from None
    net_config = ckpt["hyper_parameters"]["net"]
    cls = NETS[net_config["class_path"]]
    init_args = net_config["init_args"]
    if cls is GPT:
        init_args = {"pos_emb": "learned"} | init_args  # a GPT saved without pos_emb learned its positions
    net = cls(**init_args)
    net.load_state_dict({k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")})
    return net.to(device).eval(), tokenizer
