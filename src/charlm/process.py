"""What a run does to the whole process it shares with its caller: Lightning's lines that do not apply to charlm
left out (`quiet_lightning`), and everything process-wide a run changes put back when it ends (`process_state_kept`),
so `charlm.fit` leaves a Python session, a notebook or a sweep as it found it."""

import logging
import os
import random
import re
import signal
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

SIGNAL_LOGGER = "lightning.pytorch.trainer.connectors.signal_connector"


def not_an_advert(record: logging.LogRecord) -> bool:
    """A logging filter (a named function, so that each run adds it once) against "💡 Tip: ..." lines."""
    return not record.getMessage().startswith("💡")


def quiet_lightning() -> None:
    """Leave out what Lightning says that does not apply to charlm or that nobody running it can act on."""
    # training batch n comes from (seed, n) alone, and a fresh run into a folder that holds checkpoints is refused
    warnings.filterwarnings("ignore", "You're resuming from a checkpoint that ended before the epoch ended")
    warnings.filterwarnings("ignore", "Checkpoint directory .* exists and is not empty")
    # a small text's epoch is shorter than the logging interval: charlm logs every N steps across epochs anyway
    warnings.filterwarnings("ignore", "The number of training batches .* is smaller than the logging interval")
    # Lightning 2.6.6 still builds torch's deprecated LeafSpec (Lightning-AI/pytorch-lightning#21326)
    warnings.filterwarnings("ignore", re.escape("`isinstance(treespec, LeafSpec)` is deprecated"), FutureWarning)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(not_an_advert)
    # its "Received SIGTERM: 15": charlm says what a signal did
    logging.getLogger(SIGNAL_LOGGER).setLevel(logging.WARNING)
    if torch.cuda.is_available():  # TF32 tensor cores for float32 matmuls, as nanoGPT; Lightning warns without it
        torch.set_float32_matmul_precision("high")


# the loggers a run sets the level or the filters of
LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero", SIGNAL_LOGGER)


@contextmanager
def process_state_kept() -> Iterator[None]:
    """Put back what a run changes for the whole process: warning filters, the loggers charlm quiets, the signal
    handlers, the random generators and seed variables that Lightning sets, float32 matmul precision."""
    loggers = [(logger, logger.level, list(logger.filters)) for logger in map(logging.getLogger, LOGGERS)]
    main_thread = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    seeds = {name: os.environ.get(name) for name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")}
    generators = random.getstate(), np.random.get_state(), torch.get_rng_state()
    precision = torch.get_float32_matmul_precision()
    with warnings.catch_warnings():
        try:
            yield
        finally:
            for logger, level, filters in loggers:
                logger.setLevel(level)
                logger.filters[:] = filters
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            for name, value in seeds.items():
                os.environ.pop(name, None) if value is None else os.environ.update({name: value})
            random.setstate(generators[0])
            np.random.set_state(generators[1])
            torch.set_rng_state(generators[2])
            torch.set_float32_matmul_precision(precision)
