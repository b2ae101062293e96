"""`python -m charlm fit|validate|test|generate|attention`.

fit, validate and test are Lightning's own LightningCLI over CharLM and CharDataModule: the flags are the
`__init__` signatures, `--model.*` (CharLM, with the net under `--model.net`), `--data.*` (CharDataModule),
`--trainer.*`, `--checkpoint.*` (ResumableCheckpoint, a ModelCheckpoint), `--generation.*` (GenerationCallback) and
`--attention.*` (AttentionCallback).
generate and attention need neither a trainer nor data, only a checkpoint, so they have their own small parsers.
"""

import argparse
import logging
import os
import re
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from charlm.attention import attention_picture
from charlm.callbacks import AttentionCallback, GenerationCallback
from charlm.checkpointing import ResumableCheckpoint, lock_folder, read_checkpoint
from charlm.data import CharDataModule, read_text
from charlm.models import GPT, CharModel
from charlm.module import CharLM
from charlm.sampling import generate, load_net
from charlm.tokenizers import Tokenizer


class ArgumentParser(LightningArgumentParser):
    def error(self, message: str, ex: Exception | None = None):
        """A bad flag or config is one line, like charlm's other errors, not argparse's usage of every flag first."""
        if not self.exit_on_error:  # jsonargparse trying one type of a union: it handles the exception itself
            super().error(message, ex)
        prog = self.prog.replace(" [options]", "")
        print(f"{prog}: error: {' '.join(message.split())} ({prog} --help lists the flags)", file=sys.stderr)
        sys.exit(2)


class CharLMCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {name: args for name, args in LightningCLI.subcommands().items() if name != "predict"}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ResumableCheckpoint, "checkpoint")
        parser.add_lightning_class_args(GenerationCallback, "generation")
        parser.add_lightning_class_args(AttentionCallback, "attention")
        parser.set_defaults(
            {
                "model.net": {"class_path": "charlm.models.GPT"},
                "checkpoint.dirpath": "checkpoints/default",
                "checkpoint.filename": "step{step}-val{val/loss:.4f}",
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.monitor": "val/loss",
                "checkpoint.save_last": True,
                "checkpoint.enable_version_counter": False,  # one last.ckpt per folder, also after a move
            }
        )
        # the data decides the vocabulary and the context length; the net is built to match
        parser.link_arguments("data.vocab_size", "model.net.init_args.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.block_size", "model.net.init_args.block_size")

    def before_instantiate_classes(self) -> None:
        trainer = self.config[self.subcommand]["trainer"]
        if trainer.get("precision") is None:  # resolved here, so the run's saved config.yaml names it
            trainer["precision"] = default_precision(trainer.get("accelerator"))

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        config = self.config_init[self.subcommand]["trainer"]
        callbacks = config.get("callbacks") or []
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            # Lightning's default bar (rich, when installed) redraws the terminal after every step: measured 1 ms a
            # step on 2 cores, 4% of a gpt-cpu step. tqdm's costs 0.3 ms a redraw, so it redraws every 10 steps
            # (the loss it shows changes only on the logged steps, every 10 by default)
            kwargs["callbacks"] = [*callbacks, TQDMProgressBar(refresh_rate=10)]
        return super().instantiate_trainer(**kwargs)

    def _parse_ckpt_path(self) -> None:
        """Lightning would let a checkpoint's stored hyperparameters override the config; here the config decides
        and `_check_ckpt_path` refuses a checkpoint whose shapes do not fit it."""

    def before_fit(self) -> None:
        if self.trainer.max_steps < 1:
            raise ValueError(f"--trainer.max_steps {self.trainer.max_steps}: training is step-based, set it to >= 1")
        ckpt = self._check_ckpt_path()
        checkpoint_callback = self.trainer.checkpoint_callback
        folder = Path(checkpoint_callback.dirpath)
        if self.trainer.is_global_zero:
            lock = lock_folder(folder)
            if ckpt is None and list(folder.glob("*.ckpt")):
                lock.close()
                raise FileExistsError(
                    f"{folder}/ already holds checkpoints of an earlier run: resume it with --ckpt_path last, "
                    "or pass --checkpoint.dirpath with a new folder"
                )
            checkpoint_callback.lock = lock  # released when the run ends, however it ends
        logger = self.trainer.logger
        if ckpt and isinstance(logger, TensorBoardLogger) and logger._version is None and logger._experiment is None:
            log_folder = Path(logger.root_dir) / f"version_{ckpt.get('log_version')}"
            if log_folder.is_dir():
                # a resumed run goes on in the interrupted run's log folder; purge_step hides what that run logged
                # after this checkpoint, so every step appears exactly once
                logger._version = ckpt["log_version"]
                logger._kwargs["purge_step"] = ckpt["global_step"]

    def before_validate(self) -> None:
        self._check_ckpt_path()

    def before_test(self) -> None:
        self._check_ckpt_path()

    def _check_ckpt_path(self) -> dict | None:
        """Load --ckpt_path; fail before any work if it names nothing, is no checkpoint, or does not fit the model."""
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        if ckpt_path is None:
            return None
        if ckpt_path in ("last", "best"):
            folder = Path(self.trainer.checkpoint_callback.dirpath)
            candidates = sorted(folder.glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
            if not candidates:
                raise FileNotFoundError(
                    f"--ckpt_path {ckpt_path}: no last.ckpt in {folder}/: train first, or pass a file"
                )
            path = candidates[-1] if ckpt_path == "last" else best_checkpoint(candidates[-1])
            # Lightning loads the very file checked here (its own "best" knows only this process's checkpoints)
            self.config_init[self.subcommand]["ckpt_path"] = str(path)
        elif Path(ckpt_path).is_file():
            path = Path(ckpt_path)
        else:
            raise FileNotFoundError(f"--ckpt_path {ckpt_path} is not a file: pass a .ckpt file, last or best")
        ckpt = read_checkpoint(path)
        saved = ckpt.get("state_dict")
        if not isinstance(saved, dict) or "CharDataModule" not in ckpt:
            raise ValueError(f"--ckpt_path {path} is not a charlm checkpoint: pass a .ckpt file charlm saved")
        self.datamodule.load_state_dict(ckpt["CharDataModule"])  # the same vocabulary, or an error that says so
        expected = self.model.state_dict()
        for name in sorted(expected.keys() | saved.keys()):
            if name not in saved or name not in expected or saved[name].shape != expected[name].shape:
                there = list(saved[name].shape) if name in saved else "absent"
                here = list(expected[name].shape) if name in expected else "absent"
                raise ValueError(
                    f"--ckpt_path {path} does not fit this model: {name} is {there} in the checkpoint and {here} in "
                    "the config: use the config and flags it was trained with"
                )
        return ckpt


def trainer_defaults() -> dict:
    """What `fit` does without a config: the CPU recipe (the precision is left to `default_precision`)."""
    return {
        "max_steps": 700,
        "val_check_interval": 350,
        "check_val_every_n_epoch": None,  # count val_check_interval in steps across epochs
        "log_every_n_steps": 10,
        "plugins": [{"class_path": "charlm.checkpointing.AtomicCheckpointIO"}],
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": "logs", "name": "default"},
        },
    }


def default_precision(accelerator) -> str:
    """Mixed precision when the run is on a CUDA GPU (bf16 where the GPU has it); float32 on a CPU, where bf16 is
    emulated without native support (a forward and backward of gpt.yaml's model: 29 s under bf16 autocast, 1.3 s in
    float32 on the 2-core build machine), also with --trainer.accelerator cpu on a machine with a GPU."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def bounded(kind: type, low: float, high: float | None = None, low_open: bool = False):
    """An argparse type that accepts `kind` values in [low, high] ((low, high] with low_open) and names the range."""
    allowed = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}]"

    def parse(text: str):
        value = kind(text)
        if value < low or (low_open and value == low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is outside the allowed range {allowed}")
        return value

    return parse


def checkpoint_parser(command: str, description: str, prompt_help: str) -> argparse.ArgumentParser:
    """The arguments that generate and attention share: a checkpoint, a prompt and a device."""
    parser = argparse.ArgumentParser(prog=f"charlm {command}", description=description)
    parser.add_argument(
        "--ckpt_path",
        required=True,
        help="a .ckpt file, a folder of checkpoints, or last / best: the newest run under checkpoints/",
    )
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="", help=prompt_help)
    prompt.add_argument("--prompt_file", type=Path, help="read the prompt from this UTF-8 file")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--unknown", choices=["error", "skip"], default="error", help="prompt characters the model never saw"
    )
    return parser


def generate_parser() -> argparse.ArgumentParser:
    parser = checkpoint_parser(
        "generate", "Stream text from a trained checkpoint (the checkpoint is all it needs).", "text to continue"
    )
    parser.add_argument("--max_new_tokens", type=bounded(int, 0), default=500, help="characters to generate")
    parser.add_argument("--temperature", type=bounded(float, 0), default=0.8, help="0 is greedy (argmax)")
    parser.add_argument("--top_k", type=bounded(int, 1), help="sample among the k most likely characters")
    parser.add_argument("--top_p", type=bounded(float, 0, 1, low_open=True), help="nucleus: smallest set reaching p")
    parser.add_argument("--num_samples", type=bounded(int, 1), default=1, help="independent samples, one after another")
    parser.add_argument("--seed", type=int, default=1337, help="same seed, checkpoint, arguments and device: same text")
    return parser


def find_checkpoint(ckpt_path: str) -> Path:
    """Resolve --ckpt_path: a file, a folder (its newest last*.ckpt), or last / best under ./checkpoints/."""
    if ckpt_path in ("last", "best"):
        folder, pattern = Path("checkpoints"), "*/last*.ckpt"
    else:
        folder, pattern = Path(ckpt_path), "last*.ckpt"
        if folder.is_file():
            return folder
        if not folder.is_dir():
            raise FileNotFoundError(f"--ckpt_path {ckpt_path} does not exist: pass a .ckpt file, a folder, or last")
    candidates = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no {pattern} in {folder.resolve()}/: train first")
    return candidates[-1] if ckpt_path != "best" else best_checkpoint(candidates[-1])


def best_checkpoint(last: Path) -> Path:
    """The checkpoint with the lowest val/loss that a last.ckpt names, in the last.ckpt's folder (moved or not)."""
    states = read_checkpoint(last).get("callbacks", {})
    names = [Path(state["best_model_path"]).name for state in states.values() if state.get("best_model_path")]
    if not names or not (last.parent / names[0]).is_file():
        raise FileNotFoundError(f"--ckpt_path best: {last} names no best checkpoint that exists: pass a file")
    return last.parent / names[0]


def load_for(args: argparse.Namespace) -> tuple[Path, CharModel, str, Tokenizer, str]:
    """The checkpoint, its net, the device, the tokenizer and the prompt that checkpoint_parser's arguments name."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is available here: use --device cpu or auto")
    ckpt_path = find_checkpoint(args.ckpt_path)
    net, tokenizer = load_net(ckpt_path, device)
    prompt = read_text(args.prompt_file, "--prompt_file") if args.prompt_file else args.prompt
    prompt = prompt or "\n"  # an empty prompt starts from a newline, like a new speech
    unknown = tokenizer.unknown(prompt)
    if unknown and args.unknown == "error":
        raise ValueError(
            f"the prompt has characters {unknown!r} that are not among the model's {tokenizer.vocab_size}: "
            "change the prompt, or pass --unknown skip to drop them"
        )
    return ckpt_path, net, device, tokenizer, "".join(c for c in prompt if c not in set(unknown))


def generate_command(argv: list[str]) -> None:
    args = generate_parser().parse_args(argv)
    ckpt_path, net, device, tokenizer, prompt = load_for(args)
    print(f"charlm: sampling from {ckpt_path} on {device}", file=sys.stderr)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    idx = torch.tensor([tokenizer.encode(prompt)], device=device)
    for i in range(args.num_samples):
        if args.num_samples > 1:
            sys.stdout.write(f"===== sample {i + 1} of {args.num_samples} =====\n")
        sys.stdout.write(prompt)
        tokens = generate(net, idx, args.max_new_tokens, args.temperature, args.top_k, args.top_p, generator)
        decoder = tokenizer.decoder()
        for next_id in tokens:
            sys.stdout.write(decoder.push(next_id.item()))
            sys.stdout.flush()  # stream: each character appears as soon as it is complete
        sys.stdout.write(decoder.flush() + "\n")


def attention_command(argv: list[str]) -> None:
    parser = checkpoint_parser(
        "attention",
        "Save a picture of a GPT checkpoint's attention over a text: every layer and head, characters on both axes.",
        "the text to look at",
    )
    parser.add_argument("--out", type=Path, default=Path("attention.png"), help="the PNG file to write")
    args = parser.parse_args(argv)
    out = args.out
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out {out}: the picture is a PNG: give a file name ending in .png")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: the folder {out.parent} does not exist: create it, or write elsewhere")
    ckpt_path, net, _, tokenizer, prompt = load_for(args)
    if not isinstance(net, GPT):
        raise ValueError(f"--ckpt_path {ckpt_path} holds a {type(net).__name__}, which has no attention: pass a GPT's")
    image, note = attention_picture(net, tokenizer, tokenizer.encode(prompt))
    tmp = out.with_name(f".{out.name}.tmp")  # written whole, then renamed: never a half-written picture
    image.save(tmp, format="PNG", optimize=True)
    os.replace(tmp, out)
    n_layer, n_head = net.config["n_layer"], net.config["n_head"]
    print(f"charlm: wrote {out}: {n_layer} x {n_head} panels (layers x heads)", file=sys.stderr)
    if note:
        print(f"charlm: the text is longer than a picture fits: {note}", file=sys.stderr)


def visible(char: str) -> str:
    """A character as it can be seen in a terminal: a space as ␣, a newline as \\n, other invisible ones escaped."""
    if char in ("\n", "\t", "\r", " "):
        return {"\n": "\\n", "\t": "\\t", "\r": "\\r", " ": "␣"}[char]
    return char if char.isprintable() else char.encode("unicode_escape").decode("ascii")


def data_command(argv: list[str]) -> None:
    parser = ArgumentParser(
        prog="charlm data",
        description="A first look at a corpus: its size, alphabet, most frequent characters, opening and split. "
        "It prepares the corpus (once), so a big one can be prepared ahead of training.",
    )
    parser.add_class_arguments(CharDataModule, "data")
    args = parser.parse_args(argv)
    dm = CharDataModule(**args.data.as_dict())
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


COMMANDS = """usage: charlm {fit,validate,test,generate,attention,data} ...   (or python -m charlm ...)

  fit        train a bigram or a GPT: --config, --model.*, --data.*, --trainer.*, --checkpoint.*, ...
  validate   the exact validation loss of a checkpoint
  test       the same, reported as test/loss
  generate   stream text from a checkpoint
  attention  save a picture of a GPT checkpoint's attention
  data       a first look at a corpus (and its preparation, ahead of training)

charlm COMMAND --help lists the command's flags."""


def not_an_advert(record: logging.LogRecord) -> bool:
    """A logging filter (a named function, so that each main() call adds it once) against "💡 Tip: ..." lines."""
    return not record.getMessage().startswith("💡")


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else args
    # LightningCLI's own help and errors know only fit, validate and test
    if argv[:1] in ([], ["-h"], ["--help"]):
        print(COMMANDS, file=sys.stdout if argv else sys.stderr)
        sys.exit(0 if argv else 2)
    if not argv[0].startswith("-") and argv[0] not in ("fit", "validate", "test", "generate", "attention", "data"):
        sys.exit(f"charlm: error: {argv[0]!r} is not a command: use fit, validate, test, generate, attention or data")
    # Lightning's resume warnings do not apply: training batch n comes from (seed, n) alone, and a fresh run into a
    # folder that holds checkpoints is refused before it starts
    warnings.filterwarnings("ignore", "You're resuming from a checkpoint that ended before the epoch ended")
    warnings.filterwarnings("ignore", "Checkpoint directory .* exists and is not empty")
    # noise nobody running charlm can act on: Lightning 2.6.6 still builds torch's deprecated LeafSpec
    # (Lightning-AI/pytorch-lightning#21326), and every Trainer advertises a cloud logger
    warnings.filterwarnings("ignore", re.escape("`isinstance(treespec, LeafSpec)` is deprecated"), FutureWarning)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(not_an_advert)
    if torch.cuda.is_available():  # TF32 tensor cores for float32 matmuls, as nanoGPT; Lightning warns without it
        torch.set_float32_matmul_precision("high")
    try:
        if argv[:1] == ["generate"]:
            generate_command(argv[1:])
            return
        if argv[:1] == ["attention"]:
            attention_command(argv[1:])
            return
        if argv[:1] == ["data"]:
            data_command(argv[1:])
            return
        CharLMCLI(
            CharLM,
            CharDataModule,
            trainer_defaults=trainer_defaults(),
            seed_everything_default=1337,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},  # a resumed run rewrites config.yaml in the folder it goes on in
            parser_kwargs={"prog": "charlm"},
            parser_class=ArgumentParser,
            args=args,
        )
    except (ValueError, OSError, MisconfigurationException) as e:  # the last: Lightning's, for --trainer flags
        sys.exit(f"charlm: error: {e}")


if __name__ == "__main__":
    main()
