"""fit, validate and test: Lightning's LightningCLI over CharLM and CharDataModule, and `fit(flags)` for Python.

The flags are the `__init__` signatures: `--model.*` (CharLM, with the net under `--model.net`), `--data.*`
(CharDataModule), `--trainer.*`, `--checkpoint.*` (ResumableCheckpoint, a ModelCheckpoint), `--generation.*`
(GenerationCallback) and `--attention.*` (AttentionCallback). What `fit` trains without a config is
`configs/gpt-cpu.yaml` (jsonargparse's default config file): the recipe is written once.
"""

import json
import logging
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from rich.console import Console
from rich.text import Text

from charlm import resume, runs
from charlm.callbacks import AttentionCallback, GenerationCallback, Report, StepBar, StepLines, TrainingSpeed
from charlm.data import CharDataModule
from charlm.errors import Stopped
from charlm.files import atomic_write, check_yaml, lock_folder
from charlm.flags import Help, OneLineErrors
from charlm.process import process_state_kept, quiet_lightning
from charlm.saving import ResumableCheckpoint
from charlm.training import CharLM, check_schedule

RECIPE = Path(__file__).parent / "gpt-cpu.yaml"  # configs/gpt-cpu.yaml links here: one file, two names
# the flags whose value may be a config file (a group's own: --model my-model.yaml)
CONFIG_FLAGS = {"--config", "-c", "--trainer", "--model", "--data", "--checkpoint", "--generation", "--attention"}
FIT = (
    "Train a bigram or a GPT. The settings are read in this order, each over those before: the classes' defaults, "
    f"the recipe ({RECIPE}, which configs/gpt-cpu.yaml links to), each --config in the order given, then the flags. "
    "The classes' defaults are the recipe's model, optimizer and batch shape; so a config that names no optimizer "
    "trains with muon, the default (configs/bigram.yaml and gpt.yaml name adamw)."
)


class ArgumentParser(OneLineErrors, LightningArgumentParser):
    """LightningCLI's parser, with charlm's one-line errors."""


class SaveConfigAtTrainStart(SaveConfigCallback):
    """Write a fit's config.yaml into its log folder, whole (`atomic_write`), once training starts: after the run's
    checkpoint folder is locked and checked, so a refused run overwrites no other run's config.yaml.
    validate and test add no run, and a fit without a logger has no folder of its own: they write none (Lightning's
    would write one into the current folder)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        pass

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.logger is None or not trainer.is_global_zero:
            return
        folder = Path(trainer.logger.log_dir)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_write(folder / self.config_filename, "w") as f:
            f.write(self.parser.dump(self.config, skip_none=False))


# each command's Trainer.<method> arguments that are not flags; --verbose is charlm's in every command, and in
# validate and test it brings back Lightning's results table
COMMANDS = {
    "fit": LightningCLI.subcommands()["fit"],
    "validate": {*LightningCLI.subcommands()["validate"], "verbose"},
    "test": {*LightningCLI.subcommands()["test"], "verbose"},
}


class CharLMCLI(LightningCLI):
    """LightningCLI with charlm's callbacks and checks; `callbacks` are added to the Trainer's as they are."""

    def __init__(self, args: list[str], callbacks: Sequence[L.Callback] = ()):
        self.extra_callbacks = list(callbacks)
        self.lock = None  # the run's checkpoint folder, held from before anything is written until the run ends
        self.claimed = None  # the version folder a new run made for itself
        try:
            self.start(args)
        finally:
            if self.lock is not None:
                self.lock.close()
            runs.release(self.claimed)

    def start(self, args: list[str]) -> None:
        self.args = args
        self.command = args[0] if args and args[0] in COMMANDS else "fit"
        for i, flag in enumerate(args):  # jsonargparse would open a FIFO, and expand an alias bomb
            name, equals, value = flag.partition("=")
            value = value if equals else (args[i + 1] if i + 1 < len(args) else "")
            if name in CONFIG_FLAGS and value and (Path(value).exists() or Path(value).is_symlink()):
                check_yaml(Path(value), name)
        recipe = {"fit": {"default_config_files": [str(RECIPE)], "description": FIT}} if self.command == "fit" else {}
        super().__init__(
            CharLM,
            CharDataModule,
            trainer_defaults=trainer_defaults(),
            seed_everything_default=1337,
            auto_configure_optimizers=False,
            save_config_callback=SaveConfigAtTrainStart,
            # a prefix is a typo, not another flag
            parser_kwargs={
                "prog": "charlm",
                "allow_abbrev": False,
                "formatter_class": Help,
                **recipe,
            },
            parser_class=ArgumentParser,
            args=args,
        )

    def subcommands(self) -> dict[str, set[str]]:
        # only the command being run: building the others' parsers slowed every start
        return {self.command: COMMANDS[self.command]}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ResumableCheckpoint, "checkpoint")
        parser.add_lightning_class_args(GenerationCallback, "generation")
        parser.add_lightning_class_args(AttentionCallback, "attention")
        parser.add_argument(
            "--verbose", type=bool, default=False, help="Lightning's own lines too: seed, devices, model summary"
        )
        parser.set_defaults(
            {
                "model.net": {"class_path": "charlm.models.GPT"},
                "checkpoint.filename": "step{step}-val{val/loss:.4f}",
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.monitor": "val/loss",
            }
        )
        # the data decides the vocabulary and the context length; the net is built to match
        parser.link_arguments("data.vocab_size", "model.net.init_args.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.block_size", "model.net.init_args.block_size")

    def parse_arguments(self, parser: LightningArgumentParser, args: list[str]) -> None:
        # not LightningCLI's, which warns whenever sys.argv holds flags too (as it does in a sweep or under pytest)
        self.config = parser.parse_args(args)
        config = self.config[self.config["subcommand"]]
        self.verbose = config["verbose"]
        self.given = given_settings(parser, args) if config["ckpt_path"] or config["model"]["init_from"] else {}
        for name in ("lightning.pytorch", "lightning.fabric"):  # "Seed set to", "GPU available: False", ...
            logging.getLogger(name).setLevel(logging.INFO if self.verbose else logging.WARNING)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        trainer = config["trainer"]
        if trainer.get("enable_model_summary") is None:
            trainer["enable_model_summary"] = self.verbose
        if trainer.get("precision") is None:  # resolved here, so the run's saved config.yaml names it
            trainer["precision"] = default_precision(trainer.get("accelerator"))
        if self.subcommand == "fit":  # before any file is written: a failed run still writes its log
            check_schedule(trainer)
        self.plan = resume.plan(self.subcommand, config, self.given)
        for key, value in self.plan.changes.items():
            config[key] = value
        self.claimed = runs.place_run(config, self.plan.ckpt, self.plan.path)
        if self.subcommand != "fit":  # a score, printed: not a TensorBoard run beside the trainings
            trainer["logger"] = False

    def _parse_ckpt_path(self) -> None:
        """Lightning would merge all of a checkpoint's stored hyperparameters over the config, silently; here only
        its net is taken, and a config or flag that contradicts it is refused (`resume.architecture`), and
        the training settings are the config's. Private, until a release has Lightning-AI/pytorch-lightning#21408
        (an `adapt_checkpoint_hparams` hook for #20801)."""

    def before_fit(self) -> None:
        # what an export's model card says trained the model (the flags as given, --config files by name)
        self.trainer.checkpoint_callback.commands = [shlex.join(["python", "-m", "charlm", *self.args])]

    def after_fit(self) -> None:
        """Where the run's checkpoints and curves are, and how to sample from it."""
        trainer, saver = self.trainer, self.trainer.checkpoint_callback
        if not trainer.is_global_zero:
            return
        rows = {"last": saver.last_model_path, "best": saver.best_model_path}
        if saver.best_model_score is not None:
            rows["best"] += f" (val loss {saver.best_model_score:.4f})"
        if trainer.logger is not None:
            log_dir = Path(trainer.logger.log_dir)
            rows["curves"] = f"{log_dir} (tensorboard --logdir {log_dir.parent.parent})"
        rows["sample"] = f"python -m charlm generate --ckpt_path {saver.dirpath}"
        loss = trainer.callback_metrics.get("val/loss")
        console = Console(soft_wrap=True, highlight=False)
        console.print(
            f"[bold]charlm: trained to step {trainer.global_step}[/]" + (f", val loss {loss:.4f}" if loss else "")
        )
        for name, value in rows.items():
            if value:
                console.print(f"  [bold]{name:<7}[/]", Text(value))

    def validate(self, **kwargs) -> None:
        self.score("val", self.trainer.validate(**kwargs, verbose=self.verbose))

    def test(self, **kwargs) -> None:
        self.score("test", self.trainer.test(**kwargs, verbose=self.verbose))

    def score(self, split: str, results: list[dict]) -> None:
        """The exact loss of the checkpoint, one line on stdout."""
        (metrics,) = results
        tokens, step = int(metrics[f"{split}/tokens"]), self.plan.ckpt.get("global_step", 0)
        print(
            f"{split} loss {metrics[f'{split}/loss']:.4f} ({metrics[f'{split}/bpc']:.3f} bpc) over {tokens:,} tokens: "
            f"{self.config_init[self.subcommand]['ckpt_path']}, step {step}"
        )

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        for callback in self.trainer.callbacks:  # now: the Trainer makes the log folder before any callback's setup
            if isinstance(callback, GenerationCallback | AttentionCallback):
                callback.check_prompt(self.datamodule.tokenizer)
        for note in self.plan.check(self.subcommand, self.trainer, self.model, self.datamodule):
            print(note, file=sys.stderr)
        if self.subcommand == "fit" and rank_zero_only.rank == 0:  # the run is accepted: nothing above writes
            self.hold_folder(Path(self.config["fit"]["checkpoint"]["dirpath"]).absolute())

    def hold_folder(self, folder: Path) -> None:
        """Lock the run's checkpoint folder, and refuse a fresh run into one that holds checkpoints, once the run is
        accepted and before its logger writes anything (a refused run would leave events in a live run's log)."""
        self.lock = lock_folder(folder, "wait for it to finish, or pass --checkpoint.dirpath with another folder")
        if self.plan.ckpt is None and list(folder.glob("*.ckpt")):
            raise FileExistsError(
                f"{folder}/ already holds checkpoints of an earlier run: resume it with --ckpt_path last, or pass "
                "--checkpoint.dirpath with a new folder"
            )

    def instantiate_trainer(self, **kwargs):
        config = self.config_init[self.subcommand]["trainer"]
        callbacks = [*(config.get("callbacks") or []), *self.extra_callbacks]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(StepBar() if sys.stderr.isatty() else StepLines())
        return super().instantiate_trainer(**kwargs, callbacks=callbacks)


def given_settings(parser: LightningArgumentParser, args: list[str]) -> dict:
    """What the command's config files and flags set, without the defaults: what a checkpoint's net must agree with."""
    # the parse-time link from data.block_size needs a value: one nobody passes stands in, unless a config sets one.
    # Validated already, in full: a partial config would fail on the required values it leaves out
    argv = [args[0], "--data.block_size=-1", *args[1:]]
    given = parser.parse_args(argv, defaults=False, _skip_validation=True)[argv[0]].as_dict()
    if given["data"]["block_size"] == -1:
        del given["data"]["block_size"]
    return given


def trainer_defaults() -> dict:
    """What every run has, whatever its config: charlm's callbacks, atomic checkpoint files, the TensorBoard logger."""
    return {
        "callbacks": [TrainingSpeed(), Report()],
        "plugins": [{"class_path": "charlm.saving.AtomicCheckpointIO"}],
        "logger": {
            "class_path": "charlm.runs.RunLogger",
            "init_args": {"save_dir": "logs"},  # the name and version: runs.place_run
        },
    }


def default_precision(accelerator) -> str:
    """Mixed precision on a CUDA GPU (bf16 where the GPU has it); float32 on a CPU, also with --trainer.accelerator
    cpu on a machine with a GPU: a CPU without native bf16 emulates it, many times slower."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def run(args: list[str], callbacks: Sequence[L.Callback] = ()) -> CharLMCLI:
    """Run `charlm fit|validate|test` with these arguments in this process, which is left as it was found."""
    with process_state_kept():
        quiet_lightning()
        try:
            return CharLMCLI(args, callbacks)
        except SystemExit as e:
            if isinstance(e.__context__, KeyboardInterrupt):  # Lightning's sys.exit(1) once it caught one
                raise Stopped(signal.SIGINT, "(a KeyboardInterrupt during the run)") from None
            raise


def as_flags(settings: dict, prefix: str = "") -> list[str]:
    """Keyword settings as the flags that say the same: `{"model": {"net": {"n_layer": 2}}}` is
    `--model.net.n_layer=2` (a mapping with a class_path is one value)."""
    flags = []
    for key, value in settings.items():
        if isinstance(value, dict) and value and "class_path" not in value:
            flags += as_flags(value, f"{prefix}{key}.")
            continue
        try:
            flags.append(f"--{prefix}{key}={value if isinstance(value, str) else json.dumps(value)}")
        except TypeError:
            raise ValueError(
                f"{prefix}{key}: a {type(value).__name__} is no setting: give numbers, strings, lists or mappings "
                "(a callback object goes in callbacks=)"
            ) from None
    return flags


def fit(flags: Sequence[str] = (), callbacks: Sequence[L.Callback] = (), **settings) -> L.Trainer:
    """Train as `python -m charlm fit FLAGS` does, in this process, and return the Trainer when the run ends.

    Args:
        flags: fit's flags as on the command line: `["--config", "configs/bigram.yaml", "--trainer.max_steps", "50"]`.
        callbacks: Lightning callbacks added to the run's own (objects, not flags).
        settings: the same settings as mappings, after the flags: `model={"net": {"n_layer": 2}}`,
            `trainer={"max_steps": 100}`, `data={"path": "my.txt"}`, `config="configs/bigram.yaml"`.

    The Trainer holds the results: `trainer.callback_metrics["val/loss"]`, `trainer.checkpoint_callback`'s
    `best_model_path` and `last_model_path`, `trainer.logger.log_dir`. A refused flag raises `FlagError`, a refused
    value `ValueError` or `OSError` (one line each, as the command prints them), a SIGINT or SIGTERM during training
    `Stopped` once `last.ckpt` is saved. Warning filters, logger levels, signal handlers and random generators are
    as they were when it returns or raises.
    """
    return run(["fit", *flags, *as_flags(settings)], callbacks).trainer
