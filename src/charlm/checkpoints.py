"""charlm's checkpoints: what they hold, which file --ckpt_path names, how they are written, read and checked.

A checkpoint is Lightning's dict (weights under `state_dict`, optimizer, loops, callback states) plus:
- `hyper_parameters["net"]`: the net as `{"class_path", "init_args"}`, plain values, so it loads with weights_only;
- `CharDataModule`: the tokenizer (the DataModule's state_dict), so a checkpoint alone can generate text, and the
  training batches' block_size, batch_size and seed, so a run resumed with others can say so;
- `rng_states`: the torch and CUDA generators, so dropout after a resume draws what the run would have drawn;
- `log_version`: the TensorBoard version folder the run logged into, where a resumed run logs on;
- `hyper_parameters["init_from"]`: for a fine-tuned run, the checkpoint file its weights started from.

Whatever starts from a checkpoint (resume, validate, test, fine-tune, generate) builds the net it describes
(`checked_net`); `adopt_architecture` refuses a config or flag that says otherwise, and `start_from` carries a
checkpoint's weights over to a net for another text, character by character.

A run's checkpoints go to `checkpoints/<name>/version_N/`, beside its logs in `logs/<name>/version_N/` (`place_run`).
`--ckpt_path` means one thing in every command (`resolve`): a file is that file; a folder is its `last.ckpt`, or
else the newest `last.ckpt` one or two folders down; `last` is the checkpoint folder taken that way
(`checkpoints/<name>/` or `--checkpoint.dirpath` for fit, validate and test: the newest run of that name;
`checkpoints/` for generate, attention and `--model.init_from`: the newest run); `best` is the checkpoint with the
lowest val/loss that the `last.ckpt` so found names, in that file's folder.

Whatever stops a run, the newest checkpoint on disk is whole, and resuming from it loses only the steps since.
"""

import fcntl
import os
import signal
from pathlib import Path

import lightning as L
import torch
from jsonargparse import Namespace
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


class Stopped(BaseException):
    """A SIGINT or SIGTERM that ends a command at once, outside a training step (which finishes first and saves);
    `charlm.__main__.main` reports it in one line and exits with 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def stop_now(signum: int, frame) -> None:
    raise Stopped(signum)


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
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            # torch's zip writer turns the OSError of a write that failed (a full disk) into a RuntimeError
            error = e.__context__ if isinstance(e, RuntimeError) else e
            if not isinstance(error, OSError):
                raise
            raise OSError(
                f"could not save {path} ({error.strerror or error}): the checkpoints already there are intact; "
                "free some disk space, then resume with --ckpt_path last"
            ) from None
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
            stop_now(signum, frame)  # Ctrl-C twice: stop now; atomic writes keep the files on disk whole
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


def resolve(ckpt_path: str, folder: Path, flag: str = "--ckpt_path") -> Path:
    """The checkpoint file that `flag` (--ckpt_path, --model.init_from) names; `folder` is the one that `last` and
    `best` look in."""
    if ckpt_path not in ("last", "best"):
        folder = Path(ckpt_path)
        if folder.is_file():
            return folder
        if not folder.is_dir():
            raise FileNotFoundError(f"{flag} {ckpt_path} does not exist: pass a .ckpt file, a folder, last or best")
    last = folder / LAST
    if not last.is_file():
        # checkpoints/<name>/version_N/last.ckpt: a run's folder holds its versions, checkpoints/ its runs
        below = sorted([*folder.glob(f"*/{LAST}"), *folder.glob(f"*/*/{LAST}")], key=lambda p: p.stat().st_mtime)
        if not below:
            raise FileNotFoundError(
                f"{flag} {ckpt_path}: no {LAST} in {folder.resolve()}/: train first, or pass a file"
            )
        last = below[-1]
    return best(last, flag) if ckpt_path == "best" else last


def best(last: Path, flag: str) -> Path:
    """The checkpoint with the lowest val/loss that a last.ckpt names, in the last.ckpt's folder (moved or not)."""
    states = read(last).get("callbacks", {})
    names = [Path(state["best_model_path"]).name for state in states.values() if state.get("best_model_path")]
    if not names or not (last.parent / names[0]).is_file():
        raise FileNotFoundError(f"{flag} best: {last} names no best checkpoint that exists: pass a file")
    return last.parent / names[0]


def read(path: Path, device: torch.device | str = "cpu") -> dict:
    """A charlm checkpoint, with one-line errors; weights_only, so a pickle that would run code is refused.

    Everything charlm reads from it without a model at hand is checked here (`check_layout`), before anything uses it.
    """
    with open(path, "rb") as f:  # an error here is the file's (unreadable), after it the bytes'
        try:
            ckpt = torch.load(f, map_location=device, weights_only=True)
        except Exception as e:  # whatever its bytes make the unpickler raise, they are no checkpoint
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ValueError(f"{path} is not a valid checkpoint ({reason}): pass a .ckpt file charlm saved") from None
    try:
        check_layout(ckpt)
    except ValueError as e:
        raise ValueError(f"{path} is not a charlm checkpoint ({e}): pass a .ckpt file charlm saved") from None
    return ckpt


def expect(value, kind, what: str):
    """`value` if it is a `kind` (a bool counts as no int), else a ValueError that names `what`."""
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float)):
        raise ValueError(f"its {what} is {type(value).__name__} {str(value)[:40]!r}")
    return value


def check_layout(ckpt) -> None:
    """Refuse, naming the first bad value, a checkpoint whose net, tokenizer, step, log folder or callback states are
    not of the kinds charlm writes (a checkpoint is untrusted input: it may be tampered with or not charlm's)."""
    expect(ckpt, dict, "content")
    for name, tensor in expect(ckpt.get("state_dict"), dict, "state_dict").items():
        expect(tensor, torch.Tensor, f"weight {str(name)[:40]!r}")
        if not tensor.is_floating_point() or tensor.is_meta:
            raise ValueError(f"its weight {str(name)[:40]!r} is {tensor.dtype} on {tensor.device}, not real numbers")
    hparams = expect(ckpt.get("hyper_parameters"), dict, "hyper_parameters")
    expect(hparams.get("init_from"), str | None, "init_from")
    net = expect(hparams.get("net"), dict, "net")
    if net.get("class_path") not in NETS:
        raise ValueError(f"its net {str(net.get('class_path'))[:40]!r} is not one of {list(NETS)}")
    for name, value in expect(net.get("init_args"), dict, "net's init_args").items():
        expect(value, int | float | str | None, f"init_args {str(name)[:40]!r}")
    tokenizer_from_state(ckpt.get(DATA))
    if expect(ckpt.get("global_step", 0), int, "global_step") < 0:
        raise ValueError(f"its global_step {ckpt['global_step']} is negative")
    if ckpt.get("log_version") is not None and expect(ckpt["log_version"], int, "log_version") < 0:
        raise ValueError(f"its log_version {ckpt['log_version']} is negative")
    for name, state in expect(ckpt.get("callbacks", {}), dict, "callbacks").items():
        expect(state, dict, f"callback state {str(name)[:40]!r}")
        for key in ("best_model_path", "last_model_path", "kth_best_model_path", "dirpath"):
            expect(state.get(key, ""), str, key)
        for key in ("best_model_score", "current_score", "kth_value"):
            expect(state.get(key), torch.Tensor | None, key)
        for saved, score in expect(state.get("best_k_models", {}), dict, "best_k_models").items():
            expect(saved, str, "best_k_models path")
            expect(score, torch.Tensor, "best_k_models score")


def same_layout(value, template, what: str) -> None:
    """Refuse `value` unless it has every key of `template` and the same kinds of values, all the way down (None in
    the template: any value; a list: each element like the template's first)."""
    if template is None:
        return
    expect(value, type(template), what or "content")
    if isinstance(template, dict):
        for key, inner in template.items():
            if key not in value:
                raise ValueError(f"its {what or 'content'} has no {key!r}")
            same_layout(value[key], inner, f"{what}.{key}" if what else key)
    elif isinstance(template, (list, tuple)) and template:
        for i, item in enumerate(value):
            same_layout(item, template[0], f"{what}[{i}]")


def differing(saved: dict, expected: dict) -> str | None:
    """The first weight whose name or shape differs between two state dicts, said in words, or None."""
    for name in sorted(expected.keys() | saved.keys()):
        if name not in saved or name not in expected or saved[name].shape != expected[name].shape:
            there = list(saved[name].shape) if name in saved else "absent"
            here = list(expected[name].shape) if name in expected else "absent"
            return f"{name} is {there} in the checkpoint and {here} in"
    return None


def check_fits(ckpt: dict, path: Path, fn: str, trainer: L.Trainer, model, datamodule: L.LightningDataModule) -> None:
    """Fail before any work if a checkpoint does not fit the configured run: its vocabulary, its weight shapes, and
    what Lightning's `fn` (fit, validate or test) restores from it: loops, callback states, and to resume training
    the optimizer, the schedule and the generators."""
    datamodule.load_state_dict(ckpt[DATA])  # the same tokenizer and vocabulary, or an error that says which
    difference = differing(ckpt["state_dict"], model.state_dict())
    if difference:
        raise ValueError(
            f"--ckpt_path {path} does not fit this model: {difference} the config: use the config and flags it was "
            "trained with"
        )
    if fn == "fit" and (changes := changed_settings(ckpt, model, datamodule)):
        Console(stderr=True, soft_wrap=True, highlight=False).print(
            f"charlm: resuming with settings other than the checkpoint's: {', '.join(changes)}; the run goes on, "
            "not as it would have gone without the interruption"
        )
    template = {"epoch": 0, "loops": {f"{fn}_loop": getattr(trainer, f"{fn}_loop").state_dict()}}
    saved = ckpt.get("callbacks", {})
    template["callbacks"] = {c.state_key: c.state_dict() for c in trainer.callbacks if c.state_key in saved}
    if fn == "fit":
        groups = model.param_groups()
        optimizer = torch.optim.AdamW(groups)
        template["optimizer_states"] = [optimizer.state_dict()]
        template["lr_schedulers"] = [torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0).state_dict()]
        template["rng_states"] = {"torch": torch.get_rng_state(), "cuda": []}
    try:
        same_layout(ckpt, template, "")
        if fn == "fit":
            check_optimizer(ckpt["optimizer_states"], [p for g in groups for p in g["params"]])
            check_rng(ckpt["rng_states"])
    except ValueError as e:
        raise ValueError(f"--ckpt_path {path} cannot be resumed ({e}): pass a .ckpt file charlm saved") from None


def changed_settings(ckpt: dict, model, datamodule) -> list[str]:
    """The settings of a resumed fit that its checkpoint was trained with otherwise, as `--flag now (was then)`."""
    stream = ckpt[DATA].get("stream")
    stream = stream if isinstance(stream, dict) else {}
    pairs = {
        "--data.block_size": (stream.get("block_size"), datamodule.block_size),
        "--data.batch_size": (stream.get("batch_size"), datamodule.batch_size),
        "--seed_everything": (stream.get("seed"), torch.initial_seed()),
    }
    for key in ("lr", "min_lr", "warmup_steps", "weight_decay", "beta2"):
        pairs[f"--model.{key}"] = (ckpt["hyper_parameters"].get(key), model.hparams[key])
    return [
        f"{flag} {now} (was {then})"
        for flag, (then, now) in pairs.items()
        if isinstance(then, int | float) and then != now
    ]


def check_optimizer(states: list[dict], params: list[torch.Tensor]) -> None:
    """Each AdamW moment has the shape of the parameter it belongs to, indexed as AdamW numbers them."""
    for state in states:
        for index, moments in state["state"].items():
            if not (isinstance(index, int) and 0 <= index < len(params)):
                raise ValueError(f"its optimizer state names parameter {str(index)[:40]!r} of {len(params)}")
            for name, moment in expect(moments, dict, "optimizer state").items():
                if expect(moment, torch.Tensor, f"optimizer {name}").dim() and moment.shape != params[index].shape:
                    raise ValueError(f"its optimizer {name} of parameter {index} is {list(moment.shape)}")


def check_rng(rng: dict) -> None:
    for state in (rng["torch"], *rng["cuda"]):
        if expect(state, torch.Tensor, "generator state").dtype != torch.uint8:
            raise ValueError(f"its generator state is {state.dtype}, not uint8")
    if rng["torch"].shape != torch.get_rng_state().shape:
        raise ValueError(f"its generator state holds {rng['torch'].numel()} bytes, not {torch.get_rng_state().numel()}")


LOGGERS = ("charlm.callbacks.RunLogger", "lightning.pytorch.loggers.TensorBoardLogger")


def tensorboard(logger) -> dict | None:
    """The init_args of a TensorBoard logger's config; None for another logger or none."""
    if isinstance(logger, bool | list | None) or logger.get("class_path") not in LOGGERS:
        return None
    return logger["init_args"]


def run_name(config) -> str:
    """The name a run's folders have: the logger's name when one is given, else the config's file name, with the
    text's name after it when the text is not tiny-shakespeare, so that runs on different texts never mix."""
    init = tensorboard(config["trainer"]["logger"])
    if init is not None and init.get("name"):
        return init["name"]
    name = Path(str(config["config"][-1])).stem if config.get("config") else "default"
    return f"{name}-{Path(config['data']['path']).stem}" if config["data"]["path"] else name


def place_run(config, ckpt: dict | None, ckpt_path: Path | None) -> None:
    """Point a fit at its folders, logs/<name>/version_N/ and checkpoints/<name>/version_N/ with the same N: the next
    free N for a new run, the checkpoint's own folders for a resumed one (purge_step hides what that run logged after
    the checkpoint, so every step appears once). An explicit --checkpoint.dirpath or logger version is kept."""
    init, name = tensorboard(config["trainer"]["logger"]), run_name(config)
    if ckpt is not None:
        version = ckpt.get("log_version")
        folder = ckpt_path.parent
    else:
        runs = [
            *Path(init["save_dir"] if init else "logs", name).glob("version_*"),
            *Path("checkpoints", name).glob("version_*"),
        ]
        taken = [int(run.name[8:]) for run in runs if run.name[8:].isdigit()]
        version = max(taken, default=-1) + 1
        folder = Path("checkpoints", name, f"version_{version}")
    if init is not None:
        init["name"] = name
        if init.get("version") is None and version is not None:
            init["version"] = version
            if ckpt is not None:
                init["purge_step"] = int(ckpt.get("global_step", 0))
    if config["checkpoint"]["dirpath"] is None:
        config["checkpoint"]["dirpath"] = str(folder)


def checked_net(ckpt: dict, path: Path) -> tuple[type[Net], dict, Tokenizer]:
    """The class, init_args and tokenizer of a checkpoint's net, once they are known to describe its weights: each
    size at most the number of weights, no more layers than tensors, the net built without memory (on the meta
    device) and its weight names and shapes compared, its other buffers no larger than its weights."""
    net_config = ckpt["hyper_parameters"]["net"]
    cls = NETS[net_config["class_path"]]
    init_args = net_config["init_args"]
    if cls is GPT:
        init_args = {"pos_emb": "learned"} | init_args  # a GPT saved without pos_emb learned its positions
    weights = net_weights(ckpt)
    numel = sum(t.numel() for t in weights.values())
    sizes = {k: v for k, v in init_args.items() if isinstance(v, int) and v > numel}
    if init_args.get("n_layer", 0) > len(weights):
        sizes["n_layer"] = init_args["n_layer"]
    try:
        if sizes:
            raise ValueError(f"{sizes} exceeds the {numel:,} weights it holds")
        with torch.device("meta"):
            shell = cls(**init_args)
        difference = differing(weights, shell.state_dict())
        if difference:
            raise ValueError(f"its weights do not match its init_args: {difference} its init_args")
        if sum(b.numel() for b in shell.buffers()) > numel:
            raise ValueError(f"its init_args {init_args} build buffers larger than its weights")
        tokenizer = tokenizer_from_state(ckpt[DATA])
        if tokenizer.vocab_size != shell.config["vocab_size"]:
            raise ValueError(f"its tokenizer has {tokenizer.vocab_size} ids, its net {shell.config['vocab_size']}")
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path} is not a charlm checkpoint ({e}): pass a .ckpt file charlm saved") from None
    return cls, shell.config, tokenizer


def net_weights(ckpt: dict) -> dict[str, torch.Tensor]:
    return {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}


def check_finite(ckpt: dict, path: Path) -> None:
    """Refuse weights that hold NaN or infinity: nothing to sample or start from (resume and validate find it out
    in their first loss, and say so then)."""
    diverged = [name for name, tensor in net_weights(ckpt).items() if not tensor.isfinite().all()]
    if diverged:
        raise ValueError(
            f"{path}: its weight {diverged[0]} holds NaN or infinity (the run diverged): pass an earlier one"
        )


def load_net(path: Path, device: torch.device | str = "cpu") -> tuple[Net, Tokenizer]:
    """The net (in eval mode) and the tokenizer stored in a charlm checkpoint (`checked_net`); nothing else is
    needed."""
    ckpt = read(path, device)
    cls, init_args, tokenizer = checked_net(ckpt, path)
    check_finite(ckpt, path)
    net = cls(**init_args)
    net.load_state_dict(net_weights(ckpt))
    return net.to(device).eval(), tokenizer


def adopt_architecture(config, given: dict, ckpt: dict, path: Path, flag: str) -> None:
    """Configure the net a checkpoint holds: its class, sizes and tokenizer, and its block_size and dropout unless
    `given` (what the config files and flags set) has them. A given class, size or tokenizer that differs from the
    checkpoint's is refused, naming both; so is a block_size beyond the positions a GPT learned."""
    cls, init_args, tokenizer = checked_net(ckpt, path)
    class_path = f"{cls.__module__}.{cls.__name__}"
    net = given.get("model", {}).get("net") or {}
    if net.get("class_path", class_path) != class_path:
        raise ValueError(
            f"{flag} {path} holds a {cls.__name__}, the config or flags give --model.net "
            f"{net['class_path'].rsplit('.', 1)[-1]}: drop it, the architecture comes from the checkpoint"
        )
    args = dict(init_args)
    for key, value in (net.get("init_args") or {}).items():
        if key == "dropout":  # how the net trains, not what it is
            args[key] = value
        elif key in args and key not in ("vocab_size", "block_size") and value != args[key]:
            raise ValueError(
                f"{flag} {path} holds a {cls.__name__} with {key}={args[key]}, the config or flags give "
                f"--model.net.init_args.{key} {value}: drop it, the architecture comes from the checkpoint"
            )
    data = given.get("data") or {}
    if data.get("tokenizer", tokenizer.name) != tokenizer.name:
        raise ValueError(
            f"{flag} {path} was trained with --data.tokenizer {tokenizer.name}, the config or flags give "
            f"{data['tokenizer']}: drop it, the tokenizer comes from the checkpoint"
        )
    config["data"]["tokenizer"] = tokenizer.name
    if "block_size" in args:
        if "block_size" not in data:
            config["data"]["block_size"] = args["block_size"]
        elif args.get("pos_emb") == "learned" and data["block_size"] > args["block_size"]:
            raise ValueError(
                f"--data.block_size {data['block_size']} is longer than the {args['block_size']} positions that "
                f"{flag} {path} learned: pass at most {args['block_size']}"
            )
        args["block_size"] = config["data"]["block_size"]
    config["model"]["net"] = Namespace(class_path=class_path, init_args=Namespace(**args))


def start_from(ckpt: dict, path: Path, net: Net, tokenizer: Tokenizer) -> list[str]:
    """Load a checkpoint's weights into `net`, a net of its architecture made for another text, and return the
    characters that are new to the checkpoint. A character both know keeps the checkpoint's embedding and output
    rows (a bigram's table entries); a new one keeps the fresh rows `net` was built with. Bytes are the same 256
    ids in every run: nothing is remapped."""
    theirs = tokenizer_from_state(ckpt[DATA])
    chars = tokenizer.chars if tokenizer.name == "chars" else [chr(i) for i in range(256)]
    ids = [theirs.stoi.get(c, -1) for c in chars] if tokenizer.name == "chars" else list(range(256))
    here = torch.tensor([i for i, id in enumerate(ids) if id >= 0], dtype=torch.long)
    known = torch.tensor([id for id in ids if id >= 0], dtype=torch.long)
    if not len(known):
        raise ValueError(
            f"none of the text's {len(chars)} characters is among the {theirs.vocab_size} that --model.init_from "
            f"{path} knows: there is nothing to start from; train from scratch (drop --model.init_from)"
        )
    weights, state = net_weights(ckpt), {}
    for name, fresh in net.state_dict().items():
        old, tensor = weights[name], fresh.clone()
        if name in ("wte.weight", "lm_head.weight"):
            tensor[here] = old[known]
        elif name == "table.weight":
            tensor[here[:, None], here] = old[known[:, None], known]
        else:  # a shorter block_size uses the first of the learned positions
            tensor = old[: len(tensor)] if name == "wpe.weight" else old
        state[name] = tensor
    net.load_state_dict(state)
    return [c for c, id in zip(chars, ids) if id < 0]
