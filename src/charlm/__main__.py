"""`python -m charlm fit|validate|test`: Lightning's own LightningCLI over CharLM and CharDataModule.

The flags are the `__init__` signatures: `--model.*` (CharLM, with the net under `--model.net`), `--data.*`
(CharDataModule), `--trainer.*`, `--checkpoint.*` (ModelCheckpoint) and `--generation.*` (GenerationCallback).
"""

import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from charlm.callbacks import GenerationCallback
from charlm.data import CharDataModule
from charlm.module import CharLM


class CharLMCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {name: args for name, args in LightningCLI.subcommands().items() if name != "predict"}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(GenerationCallback, "generation")
        parser.set_defaults(
            {
                "model.net": {"class_path": "charlm.models.GPT"},
                "checkpoint.dirpath": "checkpoints/default",
                "checkpoint.filename": "step{step}-val{val/loss:.4f}",
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.monitor": "val/loss",
                "checkpoint.save_last": True,
            }
        )
        # the data decides the vocabulary and the context length; the net is built to match
        parser.link_arguments("data.vocab_size", "model.net.init_args.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.block_size", "model.net.init_args.block_size")

    def before_fit(self) -> None:
        self._check_ckpt_path()

    def before_validate(self) -> None:
        self._check_ckpt_path()

    def before_test(self) -> None:
        self._check_ckpt_path()

    def _check_ckpt_path(self) -> None:
        """`--ckpt_path last` with nothing to resume is an error, never Lightning's silent fresh start."""
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        if ckpt_path == "last":
            folder = Path(self.trainer.checkpoint_callback.dirpath)
            if not list(folder.glob("last*.ckpt")):
                raise FileNotFoundError(f"--ckpt_path last: no last.ckpt in {folder}/: train first, or pass a file")
        elif ckpt_path not in (None, "best") and not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"--ckpt_path {ckpt_path} is not a file: pass a .ckpt file, or last")


def trainer_defaults() -> dict:
    """What `fit` does without a config: the CPU recipe, with mixed precision when there is a GPU."""
    if torch.cuda.is_available():
        precision = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    else:
        precision = "32-true"
    return {
        "precision": precision,
        "max_steps": 2000,
        "val_check_interval": 250,
        "check_val_every_n_epoch": None,  # count val_check_interval in steps across epochs
        "log_every_n_steps": 1,
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": "logs", "name": "default"},
        },
    }


def main(args: list[str] | None = None) -> None:
    try:
        CharLMCLI(
            CharLM,
            CharDataModule,
            trainer_defaults=trainer_defaults(),
            seed_everything_default=1337,
            auto_configure_optimizers=False,
            args=args,
        )
    except (ValueError, OSError) as e:
        sys.exit(f"charlm: error: {e}")


if __name__ == "__main__":
    main()
