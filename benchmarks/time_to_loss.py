"""Wall seconds from process start until the exact validation loss of `python -m charlm fit` first reaches a target.

It runs the very fit that `python -m charlm fit --config CONFIG [FLAGS]` runs, in this process (the clock starts
when the process started, so the Python, torch and Lightning imports count), with logs and checkpoints in a
temporary folder. The time of each `val/loss` is the wall time TensorBoard recorded when it was logged.

    python benchmarks/time_to_loss.py --config configs/gpt-cpu.yaml --target 1.88 --data.path input.txt
    python benchmarks/time_to_loss.py --config configs/gpt.yaml --target 1.42 --data.path input.txt

Prints every validation (step, seconds, loss), the time to target, the final val loss, training tokens/s (the median
over logging intervals, so validations are left out) and peak memory.
"""

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

SCRIPT_START = time.time()


def process_start_time() -> float:
    """When this process started, in time.time() seconds (from /proc on Linux; else the first line of this script)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except OSError:
        return SCRIPT_START


def main() -> None:
    start = process_start_time()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a config of configs/")
    parser.add_argument("--target", type=float, required=True, help="the val/loss to reach")
    args, fit_flags = parser.parse_known_args()
    sys.argv[1:] = []  # the fit gets its arguments as a list: LightningCLI warns when sys.argv holds others too

    import torch
    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from charlm.__main__ import main as charlm_main

    with tempfile.TemporaryDirectory() as tmp:
        charlm_main(
            ["fit", "--config", args.config, "--trainer.logger.init_args.save_dir", f"{tmp}/logs"]
            + ["--checkpoint.dirpath", f"{tmp}/checkpoints", "--trainer.enable_progress_bar", "false", *fit_flags]
        )
        (log_dir,) = Path(tmp, "logs").glob("*/version_*")
        events = EventAccumulator(str(log_dir))
        events.Reload()
        config = yaml.safe_load((log_dir / "config.yaml").read_text())
    logged = events.Tags()["scalars"]
    val = [(e.step, e.wall_time - start, e.value) for e in events.Scalars("val/loss")] if "val/loss" in logged else []
    train = [(e.step, e.wall_time) for e in events.Scalars("train/loss")] if "train/loss" in logged else []
    if not val or len(train) < 2:
        sys.exit(
            f"time_to_loss.py: the run logged {len(val)} val/loss and {len(train)} train/loss: give it more steps "
            "than --trainer.val_check_interval and twice --trainer.log_every_n_steps"
        )

    print(f"\n{args.config} {' '.join(fit_flags)}")
    for step, seconds, loss in val:
        print(f"  step {step:6d}  {seconds:7.1f} s  val/loss {loss:.4f}")
    reached = next(((step, seconds) for step, seconds, loss in val if loss <= args.target), None)
    if reached:
        print(f"reached val/loss <= {args.target} at step {reached[0]}, {reached[1]:.1f} s after process start")
    else:
        print(f"did not reach val/loss <= {args.target}")
    tokens_per_step = config["data"]["batch_size"] * config["data"]["block_size"]
    tokens_per_step *= config["trainer"].get("accumulate_grad_batches") or 1
    rates = [(s1 - s0) * tokens_per_step / (t1 - t0) for (s0, t0), (s1, t1) in zip(train, train[1:]) if t1 > t0]
    print(f"final val/loss {val[-1][2]:.4f} at step {val[-1][0]} ({val[-1][2] / 0.6931471805599453:.4f} bpc)")
    print(f"total {time.time() - start:.1f} s, training {statistics.median(rates):,.0f} tokens/s")
    gap, s0, s1 = max((t1 - t0, s0, s1) for (s0, t0), (s1, t1) in zip(train, train[1:]))
    print(f"longest gap between logged training steps: {gap:.1f} s, steps {s0} to {s1} (validations fall in gaps)")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB", end="")
    if torch.cuda.is_available():
        print(f", peak CUDA memory allocated {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB", end="")
    print(f" ({torch.get_num_threads()} torch threads)")
    sys.exit(0 if reached else 1)


if __name__ == "__main__":
    main()
