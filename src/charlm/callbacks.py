"""Training-time callbacks."""

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from charlm.sampling import generate


class GenerationCallback(L.Callback):
    """After each validation, sample text from a fixed prompt with a fixed seed, print it and log it to TensorBoard.

    The same prompt and seed every time, so the samples differ only because the model learned.

    Args:
        prompt: the text the samples continue; every character must be in the corpus.
        max_new_tokens: characters to generate.
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
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.seed = seed

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        unknown = sorted(set(self.prompt) - set(trainer.datamodule.tokenizer.chars))
        if unknown:
            raise ValueError(
                f"the sample prompt has characters {unknown!r} that are not in the corpus: change --generation.prompt"
            )

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        tokenizer = trainer.datamodule.tokenizer
        net = pl_module.net
        idx = torch.tensor([tokenizer.encode(self.prompt)], device=pl_module.device)
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        was_training = net.training
        net.eval()
        with trainer.precision_plugin.forward_context():
            tokens = generate(net, idx, self.max_new_tokens, self.temperature, self.top_k, generator=generator)
            text = self.prompt + tokenizer.decode(torch.cat(list(tokens), dim=1)[0].tolist())
        net.train(was_training)
        print(f"\n--- sample at step {trainer.global_step} ---\n{text}\n---", flush=True)
        if isinstance(trainer.logger, TensorBoardLogger):
            # TensorBoard renders text as markdown: indenting by four spaces keeps the line breaks
            indented = "\n".join("    " + line for line in text.split("\n"))
            trainer.logger.experiment.add_text("samples", indented, global_step=trainer.global_step)
