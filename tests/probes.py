"""Callbacks that tests add to a real run (`--trainer.callbacks+=probes.RecordTraining`) to see or act inside it."""

import os
import signal
import sys

import lightning as L
import torch


class RecordTraining(L.Callback):
    """Save, per rank, the training inputs it received and its weights at the end, to probe-rank<N>.pt."""

    def __init__(self):
        self.inputs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.inputs.append(batch[0].clone())

    def on_train_end(self, trainer, pl_module):
        state = {"inputs": torch.stack(self.inputs), "state_dict": pl_module.state_dict()}
        torch.save(state, f"probe-rank{trainer.global_rank}.pt")


class InterruptAt(L.Callback):
    """Press Ctrl-C, in effect: send this process SIGINT once optimizer step `step` is done."""

    def __init__(self, step: int = 3):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


class SayValidating(L.Callback):
    """Print `probe: validating` to stderr when the first validation batch starts: a test waits for it."""

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            print("probe: validating", file=sys.stderr, flush=True)


class Spoil(L.Callback):
    """Overwrite a file's bytes in place (the same inode, so open handles see it) when training starts: a database
    that breaks under a running program."""

    def __init__(self, path: str):
        self.path = path

    def on_train_start(self, trainer, pl_module):
        with open(self.path, "r+b") as f:
            f.write(b"spoiled " * (os.path.getsize(self.path) // 8))
