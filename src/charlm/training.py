"""The LightningModule: loss, logging, the optimizer and the learning-rate schedule around an injected net."""

import math
from typing import Literal

import lightning as L
import torch
from torchmetrics import SumMetric

from charlm.models import IGNORE_INDEX, Net
from charlm.optimizers import Muon, MuonAndAdamW, muon_matrices


class CharLM(L.LightningModule):
    """Trains a character-level language model.

    Args:
        net: the model: GPT (the default; its flags --model.net.n_layer, n_head, n_embd, dropout, bias, pos_emb and
            the speedruns' options are explained by --model.net.help GPT), or Bigram (--model.net Bigram). The
            vocabulary size and block_size come from the data.
        lr: peak learning rate, reached after the warmup; a tiny model tolerates a high one.
        min_lr: the learning rate at the end of the cosine decay (lr / 10, as in nanoGPT).
        warmup_steps: optimizer steps of linear warmup from 0 to lr.
        weight_decay: AdamW weight decay, applied to matrices only (not to biases or norms).
        beta2: AdamW's second-moment decay; 0.95 suits short, fast-moving runs, 0.99 small batches over long ones.
        compile: run the net's training and validation passes through `torch.compile` (generation stays eager).
        optimizer: muon: torch's Muon (momentum orthogonalized by Newton-Schulz) for the blocks' weight matrices and
            AdamW (lr, weight_decay, beta2 above) for the embeddings, norms and biases; or adamw for every weight
            (a Bigram has no hidden matrices: it needs adamw).
        muon_lr: Muon's peak learning rate; 2.5x the public speedruns' 0.02, as a short run takes big steps. The
            schedule scales it with lr's.
        muon_weight_decay: Muon's weight decay (the public speedruns use none).
        init_from: fine-tune: a charlm checkpoint (a file, a folder, last or best, as for generate) whose weights the
            net starts from, in a new run at step 0 with a fresh optimizer and schedule. `fit` takes the net's class,
            sizes and tokenizer from it and loads its weights (`resume.start_from`); the hparams record the file.
    """

    def __init__(
        self,
        net: Net,
        lr: float = 1e-2,
        min_lr: float = 1e-3,
        warmup_steps: int = 100,
        weight_decay: float = 0.1,
        beta2: float = 0.95,
        compile: bool = False,
        init_from: str | None = None,
        optimizer: Literal["adamw", "muon"] = "muon",
        muon_lr: float = 0.05,
        muon_weight_decay: float = 0.0,
    ):
        super().__init__()
        if not isinstance(net, Net):
            raise ValueError(f"--model.net {type(net).__name__} is not a charlm model: use charlm.models.GPT or Bigram")
        if lr <= 0:
            raise ValueError(f"--model.lr {lr} must be > 0")
        if not 0 <= min_lr <= lr:
            raise ValueError(f"--model.min_lr {min_lr} must be between 0 and --model.lr {lr}")
        if warmup_steps < 0:
            raise ValueError(f"--model.warmup_steps {warmup_steps} must be >= 0")
        if not weight_decay >= 0:
            raise ValueError(f"--model.weight_decay {weight_decay} must be >= 0 (0 turns it off)")
        if not 0 <= beta2 < 1:
            raise ValueError(f"--model.beta2 {beta2} must be in [0, 1), e.g. 0.95 or 0.99")
        if optimizer not in ("adamw", "muon"):
            raise ValueError(f"--model.optimizer {optimizer!r} is not one of adamw, muon")
        if not muon_lr > 0 or not muon_weight_decay >= 0:
            raise ValueError(
                f"--model.muon_lr {muon_lr} must be > 0 and --model.muon_weight_decay {muon_weight_decay} >= 0"
            )
        if optimizer == "muon" and not muon_matrices(net):
            raise ValueError(
                f"--model.optimizer muon: a {type(net).__name__} has no hidden weight matrices: "
                "add --model.optimizer adamw (configs/bigram.yaml has it)"
            )
        self.net = net
        # the net's forward, not the LightningModule (which logs) nor the net as a module (generation's one-position
        # cached steps would each need a new graph); the parameter names stay, so checkpoints load either way
        self.net_forward = torch.compile(net.forward) if compile else net.forward
        # plain values only (the net as class path and arguments), so checkpoints load with weights_only=True
        self.save_hyperparameters(ignore=["net"])
        self.hparams["net"] = {"class_path": f"{type(net).__module__}.{type(net).__name__}", "init_args": net.config}
        # the summed loss and the number of tokens a validation predicted (--data.val_tokens bounds it). "disable": a
        # NaN loss reaches _log_eval, which stops the run; torchmetrics' default would drop it and report the rest
        self.eval_loss_sum = SumMetric(nan_strategy="disable")
        self.eval_tokens = SumMetric()

    def training_step(self, batch, batch_idx):
        x, y = batch
        _, loss = self.net_forward(x, y)
        if not torch.isfinite(loss):
            # stop before the optimizer step: the weights and every checkpoint already saved stay as they were
            raise ValueError(
                f"the training loss is {loss.item()} at step {self.global_step + 1}: stopped; the checkpoints saved "
                "so far are kept: lower --model.lr, or check the data"
            )
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:  # self.log is not free: only when written
            self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch)

    def test_step(self, batch, batch_idx):
        self._eval_step(batch)

    def on_validation_epoch_end(self):
        self._log_eval("val")

    def on_test_epoch_end(self):
        self._log_eval("test")

    def _eval_step(self, batch) -> None:
        x, y = batch
        _, loss = self.net_forward(x, y)
        # each batch's mean loss times its real (unpadded) targets: summed and divided by all targets, the exact
        # per-token mean. A batch of padding only (possible on one rank under DDP) has a NaN mean and 0 targets: it
        # adds 0. Any other NaN is the model's, and stops the run in _log_eval
        targets = (y != IGNORE_INDEX).sum()
        self.eval_loss_sum.update(torch.where(targets > 0, loss * targets, 0.0))
        self.eval_tokens.update(targets)

    def _log_eval(self, split: str) -> None:
        tokens = self.eval_tokens.compute()
        loss = self.eval_loss_sum.compute() / tokens
        self.eval_loss_sum.reset()
        self.eval_tokens.reset()
        if not torch.isfinite(loss):
            raise ValueError(
                f"the {split} loss is {loss.item()} after step {self.global_step}: stopped; the checkpoints saved "
                "so far are kept: lower --model.lr, or check the data"
            )
        # under DDP, compute() sums every rank's share, so each rank holds the same exact loss: sync_dist averages
        # equal values (and keeps Lightning from warning that epoch-level values are not synced)
        self.log(f"{split}/loss", loss, prog_bar=True, sync_dist=True)
        self.log(f"{split}/bpc", loss / math.log(2), sync_dist=True)
        self.log(f"{split}/tokens", tokens, sync_dist=True)

    def param_groups(self, exclude: set[torch.Tensor] | None = None) -> list[dict]:
        """AdamW's parameter groups: weight decay on matrices and embeddings, none on biases and norm gains."""
        params = [p for p in self.net.parameters() if exclude is None or p not in exclude]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        return [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def make_optimizer(self) -> torch.optim.Optimizer:
        """AdamW, or Muon and AdamW as one optimizer (`--model.optimizer`); the schedule is configure_optimizers'."""
        # fused: one kernel for the whole update, faster than the default loop over tensors
        fused = self.device.type in ("cpu", "cuda")
        betas = (0.9, self.hparams.beta2)
        if self.hparams.optimizer == "adamw":
            return torch.optim.AdamW(self.param_groups(), lr=self.hparams.lr, betas=betas, fused=fused)
        matrices = muon_matrices(self.net)
        adamw = torch.optim.AdamW(self.param_groups(set(matrices)), lr=self.hparams.lr, betas=betas, fused=fused)
        muon = Muon(matrices, lr=self.hparams.muon_lr, weight_decay=self.hparams.muon_weight_decay)
        return MuonAndAdamW(adamw, muon)

    def configure_optimizers(self):
        check_max_steps(self.trainer.max_steps)
        optimizer = self.make_optimizer()
        warmup, total = self.hparams.warmup_steps, self.trainer.max_steps
        floor = self.hparams.min_lr / self.hparams.lr

        def lr_factor(step: int) -> float:
            # linear warmup to lr, then cosine decay to min_lr at max_steps
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def check_max_steps(max_steps: int) -> None:
    if max_steps < 1:
        raise ValueError(f"--trainer.max_steps {max_steps}: training is step-based, set it to >= 1")


def check_schedule(trainer: dict) -> None:
    """Refuse, before a run starts, the step counts that Lightning takes and divides by only once training runs."""
    check_max_steps(trainer["max_steps"])
    for key in ("accumulate_grad_batches", "log_every_n_steps"):
        if trainer[key] is not None and trainer[key] < 1:
            raise ValueError(f"--trainer.{key} {trainer[key]} must be >= 1")
    interval = trainer["val_check_interval"]
    if interval is not None and not interval > 0:
        raise ValueError(f"--trainer.val_check_interval {interval} must be > 0: steps, or a fraction of an epoch")
