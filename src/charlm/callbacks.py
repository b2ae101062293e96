"""Training-time callbacks: the progress bars, the speed and learning rate, text samples and attention pictures."""

import io
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.compat.proto.summary_pb2 import Summary

from charlm.attention import MAX_CHARS, attention_picture
from charlm.models import GPT
from charlm.sampling import generate
from charlm.tokenizers import Tokenizer


def shown(metrics: dict) -> dict[str, str]:
    """What the progress bars show: the losses and the training speed, rounded; not Lightning's version number."""
    text = {name: f"{value:.3f}" for name, value in metrics.items() if name.endswith("/loss")}
    if "train/tokens_per_sec" in metrics:
        text["tokens/s"] = f"{metrics['train/tokens_per_sec']:,.0f}"
    return text


class StepBar(RichProgressBar):
    """Lightning's rich progress bar, counting steps, redrawn every `every` steps, with the losses and tokens/s."""

    def __init__(self, every: int = 10):
        super().__init__(refresh_rate=1)  # redraws a second besides, for the clock
        self.every = every

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self.progress is not None:  # not Lightning's "Epoch 0/-2": a run counted in steps has no last epoch
            self.progress.update(self.train_progress_bar_id, description="step")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0 or trainer.global_step == trainer.max_steps:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        return shown(super().get_metrics(trainer, pl_module))


class StepLines(ProgressBar):
    """The progress as lines of plain text, for a log file: every `every` steps and after each validation."""

    def __init__(self, every: int = 100):
        super().__init__()
        self.every = every
        self.enabled = True

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:
            self.write(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self.write(trainer, pl_module)

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled:
            metrics = "  ".join(f"{k} {v}" for k, v in shown(self.get_metrics(trainer, pl_module)).items())
            print(f"step {trainer.global_step}/{trainer.max_steps}  {metrics}", flush=True)


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


def check_prompt(prompt: str, tokenizer: Tokenizer, flag: str) -> None:
    unknown = tokenizer.unknown(prompt)
    if unknown:
        raise ValueError(f"{flag} has characters {unknown!r} that are not in the corpus: change it")


class GenerationCallback(L.Callback):
    """After each validation, sample text from a fixed prompt with a fixed seed, print it and log it to TensorBoard.

    The same prompt and seed every time, so the samples differ only because the model learned.

    Args:
        prompt: the text the samples continue; every character must be in the corpus.
        max_new_tokens: characters to generate; 0 turns the samples off.
        temperature: sampling temperature; 0 picks the most likely character.
        top_k: sample only among the k most likely characters (None: all).
        seed: seed of the sampling generator (the training random state is left alone).
    """

    def __init__(
        self,
        prompt: str = "\n",
        max_new_tokens: int = 300,
        temperature: float = 0.8,
        top_k: int | None = None,
        seed: int = 1337,
    ):
        # checked now, not at the first validation, after all the training before it
        if max_new_tokens < 0:
            raise ValueError(f"--generation.max_new_tokens {max_new_tokens} must be >= 0 (0 turns the samples off)")
        if not prompt:
            raise ValueError("--generation.prompt is empty: give at least one character (the default is a newline)")
        if not 0 <= temperature < float("inf"):  # also refuses NaN
            raise ValueError(f"--generation.temperature {temperature} must be a number >= 0 (0 is greedy)")
        if top_k is not None and top_k < 1:
            raise ValueError(f"--generation.top_k {top_k} must be >= 1, or null for every character")
        if not -(2**63) <= seed < 2**64:
            raise ValueError(f"--generation.seed {seed} is outside what a generator takes: use e.g. 1337")
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.seed = seed

    def check_prompt(self, tokenizer: Tokenizer) -> None:
        check_prompt(self.prompt, tokenizer, "--generation.prompt")  # a corpus may have no newline

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.check_prompt(trainer.datamodule.tokenizer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self.max_new_tokens == 0:
            return
        tokenizer = trainer.datamodule.tokenizer
        net = pl_module.net
        idx = torch.tensor([tokenizer.encode(self.prompt)], device=pl_module.device)
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        was_training = net.training
        net.eval()
        with trainer.precision_plugin.forward_context():
            tokens = generate(net, idx, self.max_new_tokens, self.temperature, self.top_k, generator=generator)
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
            check_prompt(self.prompt, tokenizer, "--attention.prompt")

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
        # the PNG written here: add_image turns the pixels into float32 and back first, 2.7 times slower
        png = io.BytesIO()
        image.save(png, format="PNG")
        picture = Summary.Image(
            height=image.height, width=image.width, colorspace=3, encoded_image_string=png.getvalue()
        )
        summary = Summary(value=[Summary.Value(tag="attention", image=picture)])
        logger.experiment.file_writer.add_summary(summary, trainer.global_step)
