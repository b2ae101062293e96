"""Training-time callbacks: the progress bars, the speed and learning rate, text samples and attention pictures."""

import io
import sys
import time
from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from tensorboard.compat.proto.summary_pb2 import Summary

from charlm.attention import MAX_CHARS, attention_picture
from charlm.models import GPT
from charlm.runs import RunLogger
from charlm.sampling import generate
from charlm.settings import Sampling, check, known_text
from charlm.tokenizers import Tokenizer


def shown(metrics: dict) -> dict[str, str]:
    """What the progress bars show: the losses and the training speed, rounded; not Lightning's version number."""
    text = {name.removesuffix("/loss"): f"{value:.3f}" for name, value in metrics.items() if name.endswith("/loss")}
    if "train/tokens_per_sec" in metrics:
        text["tokens/s"] = f"{metrics['train/tokens_per_sec']:,.0f}"
    return text


class StepBar(ProgressBar):
    """A rich bar on stderr over the whole run's optimizer steps (after a resume too, with the ETA of the steps
    left), with the losses and tokens/s, updated every `every` steps."""

    def __init__(self, every: int = 10):
        super().__init__()
        self.every = every
        self.progress: Progress | None = None

    def disable(self) -> None:  # Lightning's, around the sanity check: the bar starts with training
        pass

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self.progress = Progress(
            TextColumn("step"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=Console(stderr=True),
            # stdout through the bar only where both are the terminal: `fit > log.txt` keeps every line of stdout
            redirect_stdout=sys.stdout.isatty(),
            refresh_per_second=1,
        )
        self.progress.start()
        self.task = self.progress.add_task("", total=trainer.max_steps, completed=trainer.global_step, metrics="")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.progress is not None and (step % self.every == 0 or step == trainer.max_steps):
            metrics = "  ".join(f"{k} {v}" for k, v in shown(self.get_metrics(trainer, pl_module)).items())
            self.progress.update(self.task, completed=step, metrics=metrics)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.stop()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.stop()

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class StepLines(ProgressBar):
    """The progress as plain lines on stderr, for a log file: every `every` steps, with the time left."""

    def __init__(self, every: int = 100):
        super().__init__()
        self.every = every
        self.start: tuple[float, int] | None = None

    def disable(self) -> None:
        pass

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = (time.monotonic(), trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every or not trainer.is_global_zero:
            return
        began, first = self.start
        left = (time.monotonic() - began) / (step - first) * (trainer.max_steps - step) if step > first else 0
        metrics = "".join(f"  {k} {v}" for k, v in shown(self.get_metrics(trainer, pl_module)).items())
        print(f"step {step}/{trainer.max_steps}{metrics}  eta {clock(left)}", file=sys.stderr, flush=True)


def clock(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else f"{minutes}:{seconds:02d}"


class Report(L.Callback):
    """The run's story on stdout: a line per validation (step, train and exact val loss, bpc, time), a last
    validation at the last step when the schedule has none there, and in TensorBoard the run's settings (HPARAMS,
    with the best val loss), `val/best_loss` and a custom-scalars layout with train and val loss together."""

    def __init__(self):
        self.began = time.monotonic()
        self.best: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.began = time.monotonic()
        if trainer.is_global_zero:
            size = sum(p.numel() for p in pl_module.net.parameters())
            start = f"from step {trainer.global_step} " if trainer.global_step else ""
            where = (
                f"{trainer.world_size} x {pl_module.device.type}" if trainer.world_size > 1 else pl_module.device.type
            )
            print(
                f"charlm: training a {type(pl_module.net).__name__} of {size:,} parameters {start}to step "
                f"{trainer.max_steps} on {where} ({trainer.precision})",
                file=sys.stderr,
            )
        if isinstance(trainer.logger, RunLogger) and trainer.is_global_zero:
            trainer.logger.log_settings(settings(trainer, pl_module))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        # stopping at the last step makes Lightning validate it (as for early stopping), so the run ends measured
        if trainer.global_step == trainer.max_steps and trainer.global_step % trainer.val_check_batch:
            trainer.should_stop = True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        val = float(metrics["val/loss"])
        saved = trainer.checkpoint_callback.best_model_score if trainer.checkpoint_callback else None
        self.best = min([val, *(float(best) for best in (self.best, saved) if best is not None)])  # saved: resumed
        if trainer.logger is not None:  # at the step Lightning logs val/loss at: the batches stepped before it
            trainer.logger.log_metrics({"val/best_loss": self.best}, trainer.global_step - 1)
        train = f"train loss {float(metrics['train/loss']):.4f}, " if "train/loss" in metrics else ""
        elapsed = clock(time.monotonic() - self.began)
        print(
            f"step {trainer.global_step}/{trainer.max_steps}: {train}val loss {val:.4f} "
            f"({float(metrics['val/bpc']):.3f} bpc), {elapsed}",
            flush=True,
        )


def settings(trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
    """What sets one run apart from another, flat, for TensorBoard's HPARAMS."""
    dm, hparams = trainer.datamodule, pl_module.hparams
    net = {k: v for k, v in pl_module.net.config.items() if isinstance(v, int | float | str | bool)}
    keys = ("optimizer", "lr", "min_lr", "warmup_steps", "weight_decay", "beta2", "muon_lr", "muon_weight_decay")
    optimizer = {k: hparams[k] for k in keys}
    return {
        "net": type(pl_module.net).__name__,
        **net,
        **optimizer,
        "batch_size": dm.batch_size,
        "devices": trainer.world_size,
        "max_steps": trainer.max_steps,
        "tokenizer": dm.tokenizer.name,
        "data": str(dm.path) if dm.path else "tiny-shakespeare",
        "init_from": hparams.get("init_from") or "",
        "precision": str(trainer.precision),
    }


class TrainingSpeed(L.Callback):
    """Log `train/tokens_per_sec` (training tokens per second since the last logged step, in the progress bar too;
    time spent validating, sampling and checkpointing after a validation left out) and `train/lr`.

    On the logged steps only (every --trainer.log_every_n_steps). The learning rate is logged here, not by
    LearningRateMonitor, which names it once per parameter group (train/lr/pg1, train/lr/pg2): the two groups
    (with and without weight decay) share one schedule.
    """

    def __init__(self):
        self.window_start: float | None = None
        self.tokens = 0
        self.paused_at: float | None = None  # when the last validation began; training resumes at the next batch

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        if self.paused_at is not None and self.window_start is not None:
            self.window_start += time.perf_counter() - self.paused_at
        self.paused_at = None
        if (trainer.global_step + 1) % trainer.log_every_n_steps == 0:
            pl_module.log("train/lr", trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        self.tokens += batch[0].numel() * trainer.world_size
        if trainer.global_step % trainer.log_every_n_steps == 0:  # the step just taken is a logged one
            now = time.perf_counter()
            if self.window_start is not None:
                pl_module.log("train/tokens_per_sec", self.tokens / (now - self.window_start), prog_bar=True)
            self.window_start, self.tokens = now, 0

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.paused_at = time.perf_counter()


@dataclass(eq=False)
class GenerationCallback(Sampling, L.Callback):
    """After each validation, sample text from a fixed prompt with a fixed seed, print it and log it to TensorBoard:
    the same prompt and seed every time, so the samples differ only because the model learned. Its settings are
    `charlm.settings.Sampling`'s (--generation.*); --generation.max_new_tokens 0 turns the samples off."""

    def __post_init__(self):
        check(self, "--generation.")  # now, not at the first validation, after all the training before it
        self.text: str | None = None

    def check_prompt(self, tokenizer: Tokenizer) -> None:
        self.text = self.usable_prompt(tokenizer, "--generation.")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.check_prompt(trainer.datamodule.tokenizer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (
            trainer.sanity_checking
            or trainer.state.fn != "fit"
            or not trainer.is_global_zero
            or not self.max_new_tokens
        ):
            return
        tokenizer = trainer.datamodule.tokenizer
        net = pl_module.net
        idx = torch.tensor([tokenizer.encode(self.text)], device=pl_module.device)
        was_training = net.training
        net.eval()
        with trainer.precision_plugin.forward_context():
            tokens = generate(net, idx, self)
            text = tokenizer.decode(torch.cat([idx, *tokens], dim=1)[0].tolist())
        net.train(was_training)
        print(f"\n--- sample at step {trainer.global_step} ---\n{text}\n---", flush=True)
        if isinstance(trainer.logger, TensorBoardLogger):
            # TensorBoard renders text as markdown: indenting by four spaces keeps the line breaks
            indented = "\n".join("    " + line for line in text.split("\n"))
            trainer.logger.experiment.add_text("samples", indented, global_step=trainer.global_step)


class AttentionCallback(L.Callback):
    """After each validation, log a picture of the GPT's attention over a fixed text to TensorBoard (IMAGES tab).

    Every layer and head, from the model's own forward pass (see `charlm.attention`); nothing for the bigram.

    Args:
        prompt: the text; by default the first 64 tokens of the validation split.
    """

    def __init__(self, prompt: str | None = None):
        if prompt == "":
            raise ValueError("--attention.prompt is empty: give some text, or leave it out for the validation text")
        self.prompt = prompt

    def check_prompt(self, tokenizer: Tokenizer) -> None:
        if self.prompt is not None:
            known_text(tokenizer, self.prompt, "--attention.prompt")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.check_prompt(trainer.datamodule.tokenizer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = trainer.logger
        if trainer.sanity_checking or not trainer.is_global_zero or not isinstance(logger, TensorBoardLogger):
            return
        if not isinstance(pl_module.net, GPT):
            return
        tokenizer = trainer.datamodule.tokenizer
        ids = tokenizer.encode(self.prompt) if self.prompt else trainer.datamodule.val_data[:MAX_CHARS].tolist()
        image, _ = attention_picture(pl_module.net, tokenizer, ids)
        # the PNG written here: add_image turns the pixels into float32 and back first, much slower
        png = io.BytesIO()
        image.save(png, format="PNG")
        picture = Summary.Image(
            height=image.height, width=image.width, colorspace=3, encoded_image_string=png.getvalue()
        )
        summary = Summary(value=[Summary.Value(tag="val/attention", image=picture)])  # after the curves
        logger.experiment.file_writer.add_summary(summary, trainer.global_step)
