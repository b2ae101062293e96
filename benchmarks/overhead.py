"""Tokens per second of `python -m charlm fit` against a minimal plain-PyTorch loop: what Lightning costs.

Both train the same GPT (nanoGPT's CPU size by default: 4 layers, 4 heads, 128 wide, block 64, batch 12, learned
positions) from the same initial weights on the same batches (charlm's RandomWindows, seed 1337) with the same
AdamW and schedule, for the same number of steps. charlm runs through its own CLI, in this process, with the
callbacks, the TensorBoard logging (every 10 steps) and the progress bar that a user gets by default; only
validation is off (`--trainer.limit_val_batches 0`), since the plain loop has none. Times are TensorBoard's wall
time of each logged step for charlm, time.time() at the end of the same steps for the loop, from the first logged
step at or after `--skip`. The final training losses must agree: the same work.

This machine's speed drifts by 10-20% between runs of the same code, sometimes within one benchmark, so each side
runs `--repeats` times in alternating order (plain, charlm, charlm, plain, ...), and there are two ratios: the median
over the repeats of charlm's tokens/s over that of the plain run beside it (a drift slower than a pair of runs
cancels out), and the ratio of the 90th percentiles of 10-step stretches (the machine at full speed; it leaves out
the stretches with a checkpoint save).

    python benchmarks/overhead.py --data.path input.txt [--steps 300] [--repeats 9] [charlm fit flags]
"""

import argparse
import math
import resource
import statistics
import tempfile
import time
from itertools import pairwise
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from charlm.__main__ import main as charlm_main
from charlm.data import CharDataModule, RandomWindows
from charlm.models import GPT

SEED = 1337
LR, MIN_LR, WARMUP, WEIGHT_DECAY, BETA2 = 2e-3, 2e-4, 100, 0.1, 0.99
LOG_EVERY = 10  # charlm's default --trainer.log_every_n_steps: its curves have a point every 10 steps


def charlm_run(args, flags: list[str]) -> tuple[list[tuple[int, float]], float]:
    """(step, wall time) of every logged step from --skip on, and the final training loss, of `python -m charlm fit`."""
    with tempfile.TemporaryDirectory() as tmp:
        charlm_main(
            [
                "fit", "--data.path", args.data_path, "--seed_everything", str(SEED),
                "--trainer.logger.init_args.save_dir", f"{tmp}/logs", "--checkpoint.dirpath", f"{tmp}/checkpoints",
                "--trainer.max_steps", str(args.steps), "--trainer.limit_val_batches", "0",
                "--model.net.class_path", "charlm.models.GPT", "--model.net.init_args.n_layer", str(args.n_layer),
                "--model.net.init_args.n_head", str(args.n_head), "--model.net.init_args.n_embd", str(args.n_embd),
                "--model.net.init_args.pos_emb", "learned", "--model.net.init_args.dropout", "0.0",
                "--model.lr", str(LR), "--model.min_lr", str(MIN_LR), "--model.warmup_steps", str(WARMUP),
                "--model.weight_decay", str(WEIGHT_DECAY), "--model.beta2", str(BETA2), "--model.optimizer", "adamw",
                "--data.block_size", str(args.block_size), "--data.batch_size", str(args.batch_size), *flags,
            ]
        )  # fmt: skip
        (log_dir,) = Path(tmp, "logs").glob("*/version_*")
        events = EventAccumulator(str(log_dir))
        events.Reload()
        losses = events.Scalars("train/loss")
    return [(e.step, e.wall_time) for e in losses if e.step >= args.skip], losses[-1].value


def plain_run(args) -> tuple[list[tuple[int, float]], float]:
    """The same as charlm_run for a minimal loop: batches, forward, backward, AdamW, schedule."""
    datamodule = CharDataModule(args.data_path, args.block_size, args.batch_size)
    torch.manual_seed(SEED)
    net = GPT(
        datamodule.vocab_size, args.block_size, args.n_layer, args.n_head, args.n_embd, dropout=0.0, pos_emb="learned"
    )
    decay = [p for p in net.parameters() if p.dim() >= 2]
    no_decay = [p for p in net.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=(0.9, BETA2), fused=True)

    def lr_factor(step: int) -> float:
        if step < WARMUP:
            return (step + 1) / (WARMUP + 1)
        progress = min(1.0, (step - WARMUP) / max(1, args.steps - WARMUP))
        return MIN_LR / LR + (1 - MIN_LR / LR) * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    batches = iter(RandomWindows(datamodule.train_data, args.block_size, args.batch_size, SEED))
    done = []  # the time each step ended
    for _ in range(args.steps):
        x, y = next(batches)
        _, loss = net(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        done.append(time.time())
    return [
        (step, done[step]) for step in range(LOG_EVERY - 1, args.steps, LOG_EVERY) if step >= args.skip
    ], loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data.path", dest="data_path", required=True, help="tiny-shakespeare's input.txt")
    parser.add_argument("--steps", type=int, default=300, help="a multiple of 10: charlm logs every 10th step")
    parser.add_argument("--skip", type=int, default=20, help="first steps left out of the timing (warm-up)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--n_head", type=int, default=4)
    parser.add_argument("--n_embd", type=int, default=128)
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=12)
    args, flags = parser.parse_known_args()  # other flags go to charlm, e.g. --trainer.enable_progress_bar false
    results = {"plain": [], "charlm": []}
    for repeat in range(args.repeats):
        order = ("plain", "charlm") if repeat % 2 == 0 else ("charlm", "plain")  # the machine drifts: alternate
        for name in order:
            results[name].append(plain_run(args) if name == "plain" else charlm_run(args, flags))
    sizes = f"{args.n_layer} layers, {args.n_head} heads, {args.n_embd} wide, block {args.block_size}"
    print(f"\nGPT {sizes}, batch {args.batch_size}; {args.steps} steps, timed from step {args.skip}")
    tokens_per_step = args.batch_size * args.block_size
    rates, fast = {}, {}
    for name, runs in results.items():
        rates[name] = [(ends[-1][0] - ends[0][0]) * tokens_per_step / (ends[-1][1] - ends[0][1]) for ends, _ in runs]
        intervals = [
            (s1 - s0) * tokens_per_step / (t1 - t0) for ends, _ in runs for (s0, t0), (s1, t1) in pairwise(ends)
        ]
        fast[name] = statistics.quantiles(intervals, n=10)[-1]
        listed = ", ".join(f"{rate:,.0f}" for rate in rates[name])
        print(f"{name:>7}: {statistics.median(rates[name]):8,.0f} tokens/s, median run (runs: {listed});")
        fastest = f"{fast[name]:,.0f} in the fastest 10% of {LOG_EVERY}-step stretches"
        print(f"         {fastest}; final train loss {runs[0][1]:.4f}")
    paired = [c / p for c, p in zip(rates["charlm"], rates["plain"])]
    print(f"  ratio charlm / plain: {statistics.median(paired):.3f} (median of the repeats' ratios: ", end="")
    print(f"{', '.join(f'{r:.3f}' for r in paired)}), {fast['charlm'] / fast['plain']:.3f} (fast stretches)")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MiB, {torch.get_num_threads()} threads")
    plain_loss, charlm_loss = results["plain"][0][1], results["charlm"][0][1]
    if abs(plain_loss - charlm_loss) > 1e-4:
        raise SystemExit(f"the final losses differ ({charlm_loss} vs {plain_loss}): the runs did not do the same work")


if __name__ == "__main__":
    main()
