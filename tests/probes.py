"""A callback the DDP test adds to a real run (`--trainer.callbacks+=probes.RecordTraining`) to see inside each rank."""

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
