"""CharLM and CharDataModule under a real Trainer."""

import math
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.nn import functional as F
from torch.utils.data import DataLoader

from charlm.callbacks import GenerationCallback, TrainingSpeed
from charlm.data import CharDataModule, ValidationWindows
from charlm.models import GPT, Bigram
from charlm.training import CharLM


def trainer(tmp_path, **kwargs) -> L.Trainer:
    options = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        log_every_n_steps=1,
    )
    return L.Trainer(**(options | kwargs))


def test_validation_loss_is_the_exact_mean_over_every_validation_token(corpus, tmp_path):
    torch.manual_seed(0)
    dm = CharDataModule(path=str(corpus), block_size=48, batch_size=256)
    net = GPT(vocab_size=dm.vocab_size, block_size=48, n_layer=1, n_head=2, n_embd=32)
    [metrics] = trainer(tmp_path).validate(CharLM(net), datamodule=dm, verbose=False)

    # the reference: the summed loss of every token of the split after the first, from 48-character windows
    val, total = torch.from_numpy(dm.val_data.astype(np.int64)), 0.0
    with torch.no_grad():
        for start in range(0, len(val) - 1, 48):
            x, y = val[start : start + 48][None], val[start + 1 : start + 49][None]
            x = x[:, : y.size(1)]
            total += F.cross_entropy(net(x)[0][0], y[0], reduction="sum").item()
    expected = total / (len(val) - 1)
    assert metrics["val/loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["val/bpc"] == pytest.approx(expected / math.log(2), rel=1e-5)

    # DDP pads the windows to a multiple of the world size, so a rank may get a batch of padding only: it adds nothing
    windows = ValidationWindows(dm.val_data, 48, multiple=len(val) // 48 + 2)  # the real windows, then one of padding
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "Encountered `nan`")
        [padded] = trainer(tmp_path).validate(CharLM(net), DataLoader(windows, batch_size=len(val) // 48 + 1))
    assert padded["val/loss"] == pytest.approx(expected, rel=1e-5)


def test_fit_learns_a_tiny_text_with_warmup_then_cosine_decay(tiny_text, tmp_path):
    torch.manual_seed(0)
    dm = CharDataModule(path=str(tiny_text), block_size=16, batch_size=16)
    model = CharLM(
        Bigram(vocab_size=dm.vocab_size), optimizer="adamw", lr=0.1, min_lr=0.01, warmup_steps=5, weight_decay=0.0
    )
    logger = TensorBoardLogger(tmp_path, name="tiny")
    steps = dict(max_steps=60, val_check_interval=30, check_val_every_n_epoch=None)
    fit = trainer(tmp_path, **steps, logger=logger, callbacks=[TrainingSpeed()])
    fit.fit(model, datamodule=dm)

    events = EventAccumulator(logger.log_dir)
    events.Reload()
    lr = [e.value for e in events.Scalars("train/lr")]
    assert lr[:5] == pytest.approx([0.1 * (i + 1) / 6 for i in range(5)])  # linear warmup
    assert max(lr) == pytest.approx(0.1, rel=1e-3)
    assert lr[-1] == pytest.approx(0.01, abs=1e-3)  # cosine decay reaches min_lr at max_steps
    assert all(a >= b for a, b in zip(lr[5:], lr[6:]))
    val = [e.value for e in events.Scalars("val/loss")]
    assert len(val) == 2 and val[-1] < 1.0  # from ln(13) = 2.56 for a uniform guess over 13 characters


def test_generation_callback_prints_and_logs_the_same_sample_for_the_same_weights(tiny_text, tmp_path, capsys):
    dm = CharDataModule(path=str(tiny_text), block_size=16, batch_size=16)
    torch.manual_seed(0)
    model = CharLM(GPT(vocab_size=dm.vocab_size, block_size=16, n_layer=1, n_head=1, n_embd=16))
    callback = GenerationCallback(prompt="hello", max_new_tokens=40, seed=3)
    logger = TensorBoardLogger(tmp_path, name="samples")
    trainer(tmp_path, max_steps=2, val_check_interval=1, callbacks=[callback], logger=logger).fit(model, datamodule=dm)

    samples = capsys.readouterr().out.split("--- sample at step ")[1:]
    assert [s.split(" ---")[0] for s in samples] == ["1", "2"]
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    logged = [e.tensor_proto.string_val[0].decode() for e in events.Tensors("samples/text_summary")]
    assert len(logged) == 2 and all(line.startswith("    ") for line in logged[0].split("\n"))
    assert logged[0].split("\n")[0] == "    hello" + samples[0].split("\nhello")[1].split("\n")[0]


def test_a_prompt_outside_the_vocabulary_stops_training_before_it_starts(tiny_text, tmp_path):
    dm = CharDataModule(path=str(tiny_text), block_size=16, batch_size=16)
    model = CharLM(Bigram(vocab_size=dm.vocab_size), optimizer="adamw")
    callback = GenerationCallback(prompt="ROMEO:")
    with pytest.raises(ValueError, match="'E', 'M', 'O', 'R'"):
        trainer(tmp_path, max_steps=1, callbacks=[callback]).fit(model, datamodule=dm)
