"""`python -m charlm fit|validate|test|generate|attention|data`: one table of commands (COMMANDS).

fit, validate and test are Lightning's own LightningCLI over CharLM and CharDataModule: the flags are the
`__init__` signatures, `--model.*` (CharLM, with the net under `--model.net`), `--data.*` (CharDataModule),
`--trainer.*`, `--checkpoint.*` (ResumableCheckpoint, a ModelCheckpoint), `--generation.*` (GenerationCallback) and
`--attention.*` (AttentionCallback). generate, attention and data need no trainer: they are the functions below,
their flags the functions' typed arguments, their --help the docstrings (jsonargparse).
"""

import argparse
import json
import logging
import os
import re
import signal
import sys
import warnings
from pathlib import Path
from typing import Literal

import torch
from jsonargparse import DefaultHelpFormatter
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveInt, restricted_number_type
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from charlm import checkpoints, sampling
from charlm.attention import attention_picture
from charlm.callbacks import AttentionCallback, GenerationCallback, Report, StepBar, StepLines, TrainingSpeed
from charlm.data import CharDataModule, read_text
from charlm.models import GPT
from charlm.training import CharLM, check_schedule

Probability = restricted_number_type("Probability", float, [(">", 0), ("<=", 1)])


class ArgumentParser(LightningArgumentParser):
    def error(self, message: str, ex: Exception | None = None):
        """A bad flag or config is one line, like charlm's other errors, not argparse's usage of every flag first."""
        if not self.exit_on_error:  # jsonargparse trying one type of a union: it handles the exception itself
            super().error(message, ex)
        prog = self.prog.replace(" [options]", "")
        # of a union's errors, the first (not the one for None) says what is wrong
        message = re.sub(
            r"Does not validate .*?Errors:\s*- (.*?)\s*- Expected a <class 'NoneType'>", r"\1,", message, flags=re.S
        )
        message = re.sub(r",? Given value type: <class '\w+'>", "", message)  # the value given says enough
        print(f"{prog}: error: {' '.join(message.split())} ({prog} --help lists the flags)", file=sys.stderr)
        sys.exit(2)


class Help(DefaultHelpFormatter):
    """--help a person reads in a terminal: a one-line usage, and Lightning's Trainer and ModelCheckpoint flags as
    one sentence and their default each (the whole text is in Lightning's docs); charlm's own flags in full."""

    def _format_usage(self, usage, actions, groups, prefix) -> str:
        if prefix == "":  # argparse asking for the prog that a subcommand's own prog starts with
            return self._prog
        return f"usage: {self._prog.replace(' [options]', '')} [--config CONFIG] [--FLAG VALUE ...]\n\n"

    def _get_help_string(self, action) -> str:
        if (
            not action.dest.startswith(("trainer.", "checkpoint."))
            or action.dest == "checkpoint.save_last_every_n_steps"
        ):
            return super()._get_help_string(action)
        sentence = re.split(r"(?<=\.)\s", " ".join((action.help or "").split()), maxsplit=1)[0].replace("%", "%%")
        return sentence if action.default == argparse.SUPPRESS else f"{sentence} (default: %(default)s)"


class SaveConfigAtTrainStart(SaveConfigCallback):
    """Write a fit's config.yaml once training starts: after ResumableCheckpoint has locked and checked its folder,
    so a refused run overwrites no other run's config.yaml."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer, pl_module) -> None:
        super().setup(trainer, pl_module, "fit")


class CharLMCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # --verbose is charlm's in every command: in validate and test it brings back Lightning's results table
        skips = LightningCLI.subcommands()
        return {"fit": skips["fit"], "validate": {*skips["validate"], "verbose"}, "test": {*skips["test"], "verbose"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(checkpoints.ResumableCheckpoint, "checkpoint")
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

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
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
        self.ckpt = path = None
        if config.get("ckpt_path") is not None:
            runs = config["checkpoint"]["dirpath"] or Path("checkpoints", checkpoints.run_name(config))
            path = checkpoints.resolve(config["ckpt_path"], Path(runs))
            config["ckpt_path"] = str(path)  # Lightning loads the very file checked here
            self.ckpt = checkpoints.read(path)
        elif self.subcommand != "fit":
            raise ValueError(
                f"{self.subcommand} scores a trained checkpoint: pass --ckpt_path last, best or a .ckpt file"
            )
        self.init_ckpt = self.starting_point(config) if self.subcommand == "fit" else None
        if self.ckpt is not None:
            checkpoints.adopt_architecture(config, self.given, self.ckpt, path, "--ckpt_path")
        elif self.init_ckpt is not None:
            init_from = Path(config["model"]["init_from"])
            checkpoints.adopt_architecture(config, self.given, self.init_ckpt, init_from, "--model.init_from")
        checkpoints.place_run(config, self.ckpt, path)
        if self.subcommand != "fit":  # a score, printed: not a TensorBoard run beside the trainings
            trainer["logger"] = False

    def starting_point(self, config) -> dict | None:
        """The checkpoint that --model.init_from names for a new run, read and checked, its file recorded in the
        config. A resumed run records what its checkpoint does: where the weights it was started from came from."""
        init_from = config["model"]["init_from"]
        if self.ckpt is not None:
            recorded = self.ckpt["hyper_parameters"].get("init_from")
            resumes_it = init_from in (None, recorded) or (
                recorded is not None
                and Path(recorded).is_file()
                and checkpoints.resolve(init_from, Path("checkpoints"), "--model.init_from").samefile(recorded)
            )
            if not resumes_it:
                raise ValueError(
                    f"--model.init_from {init_from} and --ckpt_path {config['ckpt_path']} both given: --ckpt_path "
                    "resumes the run it names, --model.init_from starts a new one from a checkpoint's weights: drop one"
                )
            config["model"]["init_from"] = recorded
            return None
        if init_from is None:
            return None
        path = checkpoints.resolve(init_from, Path("checkpoints"), "--model.init_from")
        config["model"]["init_from"] = str(path)
        ckpt = checkpoints.read(path)
        checkpoints.check_finite(ckpt, path)
        return ckpt

    def _parse_ckpt_path(self) -> None:
        """Lightning would merge all of a checkpoint's stored hyperparameters over the config, silently; here only
        its net is taken, and a config or flag that contradicts it is refused (`checkpoints.adopt_architecture`), and
        the training settings are the config's. Private, until a release has Lightning-AI/pytorch-lightning#21408
        (an `adapt_checkpoint_hparams` hook for #20801)."""

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
        tokens, step = int(metrics[f"{split}/tokens"]), self.ckpt.get("global_step", 0)
        print(
            f"{split} loss {metrics[f'{split}/loss']:.4f} ({metrics[f'{split}/bpc']:.3f} bpc) over {tokens:,} tokens: "
            f"{self.config_init[self.subcommand]['ckpt_path']}, step {step}"
        )

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        for callback in self.trainer.callbacks:  # now: the Trainer makes the log folder before any callback's setup
            if isinstance(callback, GenerationCallback | AttentionCallback):
                callback.check_prompt(self.datamodule.tokenizer)
        if self.ckpt is not None:
            ckpt_path = self.config_init[self.subcommand]["ckpt_path"]
            checkpoints.check_fits(self.ckpt, ckpt_path, self.subcommand, self.trainer, self.model, self.datamodule)
        if self.init_ckpt is not None:
            path = self.model.hparams.init_from
            new = checkpoints.start_from(self.init_ckpt, path, self.model.net, self.datamodule.tokenizer)
            about = "it knows every character of this text"
            if new:
                shown = ": " + " ".join(visible(c) for c in new) if len(new) <= 20 else ""
                about = f"{len(new)} of this text's {self.datamodule.vocab_size} characters are new to it"
                about += f" and start untrained{shown}"
            print(f"charlm: starting from {path} (step {self.init_ckpt['global_step']}): {about}", file=sys.stderr)

    def instantiate_trainer(self, **kwargs):
        config = self.config_init[self.subcommand]["trainer"]
        callbacks = config.get("callbacks") or []
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs["callbacks"] = [*callbacks, StepBar() if sys.stderr.isatty() else StepLines()]
        return super().instantiate_trainer(**kwargs)


def given_settings(parser: LightningArgumentParser, args: list[str] | None) -> dict:
    """What the command's config files and flags set, without the defaults: what a checkpoint's net must agree with."""
    argv = sys.argv[1:] if args is None else list(args)
    # the parse-time link from data.block_size needs a value: one nobody passes stands in, unless a config sets one.
    # Validated already, in full: a partial config would fail on the required values it leaves out
    argv = [argv[0], "--data.block_size=-1", *argv[1:]]
    given = parser.parse_args(argv, defaults=False, _skip_validation=True)[argv[0]].as_dict()
    if given["data"]["block_size"] == -1:
        del given["data"]["block_size"]
    return given


def trainer_defaults() -> dict:
    """What `fit` does without a config: the CPU recipe (the precision is left to `default_precision`)."""
    return {
        "max_steps": 700,
        "val_check_interval": 350,
        "check_val_every_n_epoch": None,  # count val_check_interval in steps across epochs
        "log_every_n_steps": 10,
        "callbacks": [TrainingSpeed(), Report()],
        "plugins": [{"class_path": "charlm.checkpoints.AtomicCheckpointIO"}],
        "logger": {
            "class_path": "charlm.callbacks.RunLogger",
            "init_args": {"save_dir": "logs"},  # the name and version: checkpoints.place_run
        },
    }


def default_precision(accelerator) -> str:
    """Mixed precision on a CUDA GPU (bf16 where the GPU has it); float32 on a CPU, also with --trainer.accelerator
    cpu on a machine with a GPU: a CPU without native bf16 emulates it, many times slower."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def load(ckpt_path: str, prompt: str, prompt_file: str | None, device: str, unknown: str):
    """The checkpoint's file, net and tokenizer, the device and the prompt that generate and attention are given."""
    if prompt and prompt_file:
        raise ValueError("--prompt and --prompt_file both given: pass one of them")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is available here: use --device cpu or auto")
    path = checkpoints.resolve(ckpt_path, Path("checkpoints"))
    net, tokenizer = checkpoints.load_net(path, device)
    prompt = (read_text(Path(prompt_file), "--prompt_file") if prompt_file else prompt) or "\n"  # like a new speech
    missing = tokenizer.unknown(prompt)
    if missing and unknown == "error":
        raise ValueError(
            f"the prompt has characters {missing!r} that are not among the model's {tokenizer.vocab_size}: "
            "change the prompt, or pass --unknown skip to drop them"
        )
    return path, net, tokenizer, device, "".join(c for c in prompt if c not in set(missing))


def generate(
    ckpt_path: str,
    prompt: str = "",
    prompt_file: str | None = None,
    max_new_tokens: NonNegativeInt = 500,
    temperature: NonNegativeFloat = 0.8,
    top_k: PositiveInt | None = None,
    top_p: Probability | None = None,
    num_samples: PositiveInt = 1,
    seed: int = 1337,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    unknown: Literal["error", "skip"] = "error",
) -> None:
    """Stream text from a trained checkpoint to stdout (the checkpoint is all it needs).

    Args:
        ckpt_path: a .ckpt file; a folder (its last.ckpt, else the newest one a folder down); last: the newest run
            under checkpoints/; best: that run's lowest val/loss.
        prompt: the text to continue (empty: a newline).
        prompt_file: read the prompt from this UTF-8 file instead.
        max_new_tokens: characters to generate.
        temperature: 0 is greedy (argmax).
        top_k: sample among the k most likely characters.
        top_p: nucleus: sample among the smallest set of characters whose probability reaches p.
        num_samples: independent samples, one after another.
        seed: the same seed, checkpoint, arguments and device give the same text.
        device: where to run the model.
        unknown: what to do with prompt characters the model never saw.
    """
    path, net, tokenizer, device, prompt = load(ckpt_path, prompt, prompt_file, device, unknown)
    print(f"charlm: sampling from {path} on {device}", file=sys.stderr)
    generator = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([tokenizer.encode(prompt)], device=device)
    for i in range(num_samples):
        if num_samples > 1:
            sys.stdout.write(f"===== sample {i + 1} of {num_samples} =====\n")
        sys.stdout.write(prompt)
        decoder = tokenizer.decoder()
        for next_id in sampling.generate(net, idx, max_new_tokens, temperature, top_k, top_p, generator):
            sys.stdout.write(decoder.push(next_id.item()))
            sys.stdout.flush()  # stream: each character appears as soon as it is complete
        sys.stdout.write(decoder.flush() + "\n")


def attention(
    ckpt_path: str,
    prompt: str = "",
    prompt_file: str | None = None,
    out: str = "attention.png",
    device: Literal["auto", "cpu", "cuda"] = "auto",
    unknown: Literal["error", "skip"] = "error",
) -> None:
    """Save a picture of a GPT checkpoint's attention over a text: every layer and head, characters on both axes.

    Args:
        ckpt_path: a .ckpt file, a folder, last or best, as for generate.
        prompt: the text to look at.
        prompt_file: read the text from this UTF-8 file instead.
        out: the PNG file to write (written whole, then renamed onto the name).
        device: where to run the model.
        unknown: what to do with characters the model never saw.
    """
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out {out}: the picture is a PNG: give a file name ending in .png")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: the folder {out.parent} does not exist: create it, or write elsewhere")
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a folder: give a file name ending in .png")
    path, net, tokenizer, _, prompt = load(ckpt_path, prompt, prompt_file, device, unknown)
    if not isinstance(net, GPT):
        raise ValueError(f"--ckpt_path {path} holds a {type(net).__name__}, which has no attention: pass a GPT's")
    image, note = attention_picture(net, tokenizer, tokenizer.encode(prompt))
    tmp = out.with_name(f".{out.name}.tmp")  # never a half-written picture
    try:
        image.save(tmp, format="PNG", optimize=True)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    n_layer, n_head = net.config["n_layer"], net.config["n_head"]
    print(f"charlm: wrote {out}: {n_layer} x {n_head} panels (layers x heads)", file=sys.stderr)
    if note:
        print(f"charlm: the text is longer than a picture fits: {note}", file=sys.stderr)


def visible(char: str) -> str:
    """A character as it can be seen in a terminal: a space as ␣, a newline as \\n, other invisible ones escaped."""
    if char in ("\n", "\t", "\r", " "):
        return {"\n": "\\n", "\t": "\\t", "\r": "\\r", " ": "␣"}[char]
    return char if char.isprintable() else char.encode("unicode_escape").decode("ascii")


def data(data: CharDataModule) -> None:
    """A first look at a corpus: its size, alphabet, most frequent characters, opening and split.

    It prepares the corpus (once), so a big one can be prepared ahead of training.

    Args:
        data: the corpus and its split, as fit takes them (--data.path, --data.tokenizer, ...).
    """
    dm = data
    meta, tokenizer = dm.corpus.meta, dm.tokenizer
    if tokenizer.name == "chars":
        symbols = [visible(c) for c in tokenizer.chars]
        opening = tokenizer.decode(dm.train_data[:500].tolist())
    else:
        symbols = [visible(chr(b)) if b < 128 else f"\\x{b:02x}" for b in range(256)]
        opening = tokenizer.decode(dm.train_data[:2000].tolist())[:500]
    present = [s for s, count in zip(symbols, meta["counts"]) if count]
    alphabet = "".join(present[:300]) + (f" … and {len(present) - 300:,} more" if len(present) > 300 else "")
    source = Path(meta["sources"][0]["path"]) if len(meta["sources"]) == 1 else f"{len(meta['sources'])} .txt files"
    facts = Table(box=None, show_header=False, title="corpus", title_justify="left")
    facts.add_row("source", str(source))
    facts.add_row("text", f"{meta['characters']:,} characters, {meta['bytes']:,} bytes")
    facts.add_row("tokenizer", f"{tokenizer.name}: a vocabulary of {tokenizer.vocab_size}, stored as {meta['dtype']}")
    facts.add_row("alphabet", Text(alphabet))
    facts.add_row("split", f"{len(dm.train_data):,} training and {len(dm.val_data):,} validation tokens")
    facts.add_row("validation", f"each predicts the first {len(dm.val_window) - 1:,} validation tokens")
    size = (dm.corpus.folder / "tokens.bin").stat().st_size / 1e6
    facts.add_row("prepared", f"{dm.corpus.folder}/ (tokens.bin {size:,.1f} MB, meta.json)")
    frequent = Table("", "count", "share", title="most frequent", title_justify="left", box=None)
    total = sum(meta["counts"])
    for count, symbol in sorted(zip(meta["counts"], symbols), reverse=True)[:10]:
        frequent.add_row(symbol, f"{count:,}", f"{count / total:.2%}")
    console = Console()
    console.print(facts, frequent, Panel(Text(opening), title="the first 500 characters", title_align="left"))


COMMANDS = {
    "fit": "train a bigram or a GPT: --config, --model.*, --data.*, --trainer.*, --checkpoint.*, ...",
    "validate": "the exact validation loss of a checkpoint",
    "test": "the same, reported as test/loss",
    "generate": generate,
    "attention": attention,
    "data": data,
    "sweep": "search hyperparameters on Optuna: trials of fit, stopped early when clearly worse",
}


def usage() -> str:
    lines = [f"usage: charlm {{{','.join(COMMANDS)}}} ...   (or python -m charlm ...)", ""]
    for name, command in COMMANDS.items():
        about = command if isinstance(command, str) else command.__doc__.split("\n")[0].rstrip(".")
        lines.append(f"  {name:<10} {about[0].lower()}{about[1:]}")
    return "\n".join([*lines, "", "charlm COMMAND --help lists the command's flags."])


def run(name: str, function, argv: list[str]) -> None:
    """Parse argv into the function's typed arguments (a class-typed one is built from its flags) and call it."""
    description = function.__doc__.split("\n\n")[0]
    parser = ArgumentParser(prog=f"charlm {name}", description=description, allow_abbrev=False, formatter_class=Help)
    parser.add_function_arguments(function, as_group=False)
    function(**vars(parser.instantiate(parser.parse_args(argv))))


def not_an_advert(record: logging.LogRecord) -> bool:
    """A logging filter (a named function, so that each main() call adds it once) against "💡 Tip: ..." lines."""
    return not record.getMessage().startswith("💡")


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else args
    if args is None:  # the name that help about a class (--model.net.help GPT) gives the program
        sys.argv[0] = "charlm"
    # LightningCLI's own help and errors know only fit, validate and test
    if argv[:1] in ([], ["-h"], ["--help"]):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        sys.exit(0 if argv else 2)
    if not argv[0].startswith("-") and argv[0] not in COMMANDS:
        names = ", ".join(COMMANDS).rsplit(", ", 1)
        sys.exit(f"charlm: error: {argv[0]!r} is not a command: use {' or '.join(names)}")
    # Lightning's resume warnings do not apply: training batch n comes from (seed, n) alone, and a fresh run into a
    # folder that holds checkpoints is refused before it starts
    warnings.filterwarnings("ignore", "You're resuming from a checkpoint that ended before the epoch ended")
    warnings.filterwarnings("ignore", "Checkpoint directory .* exists and is not empty")
    # a small text's epoch is shorter than the logging interval: charlm logs every N steps across epochs anyway
    warnings.filterwarnings("ignore", "The number of training batches .* is smaller than the logging interval")
    # noise nobody running charlm can act on: Lightning 2.6.6 still builds torch's deprecated LeafSpec
    # (Lightning-AI/pytorch-lightning#21326), and every Trainer advertises a cloud logger
    warnings.filterwarnings("ignore", re.escape("`isinstance(treespec, LeafSpec)` is deprecated"), FutureWarning)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(not_an_advert)
    # its "Received SIGTERM: 15": charlm says what a signal did
    logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector").setLevel(logging.WARNING)
    if torch.cuda.is_available():  # TF32 tensor cores for float32 matmuls, as nanoGPT; Lightning warns without it
        torch.set_float32_matmul_precision("high")
    # until a training loop takes them over, a signal stops the command at once (Lightning's own SIGTERM handler
    # calls this one after it; alone, it would end a validation with exit code 0)
    handlers = {signum: signal.signal(signum, checkpoints.stop_now) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        command = COMMANDS.get(argv[0])
        if argv[0] == "sweep":
            from charlm.sweep import sweep  # Optuna's import takes time: only a sweep pays it

            if "--" in argv:  # sweep [FLAGS] -- [FIT FLAGS]: the rest is for every trial's fit
                argv = [*argv[: argv.index("--")], "--fit", json.dumps(argv[argv.index("--") + 1 :])]
            command = sweep
        if callable(command):
            run(argv[0], command, argv[1:])
            return
        CharLMCLI(
            CharLM,
            CharDataModule,
            trainer_defaults=trainer_defaults(),
            seed_everything_default=1337,
            auto_configure_optimizers=False,
            save_config_callback=SaveConfigAtTrainStart,
            save_config_kwargs={"overwrite": True},  # a resumed run rewrites config.yaml in the folder it goes on in
            # a prefix is a typo, not another flag
            parser_kwargs={"prog": "charlm", "allow_abbrev": False, "formatter_class": Help},
            parser_class=ArgumentParser,
            args=args,
        )
    except checkpoints.Stopped as e:
        name = signal.Signals(e.signum).name
        print(f"charlm: {name} received: stopped", file=sys.stderr)
        sys.exit(128 + e.signum)
    except BrokenPipeError:  # stdout closed early (generate | head): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        sys.exit(141)
    except (ValueError, OSError, MisconfigurationException) as e:  # the last: Lightning's, for --trainer flags
        sys.exit(f"charlm: error: {e}")
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    main()
