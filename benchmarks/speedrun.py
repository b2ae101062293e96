"""The 2026 speedruns' techniques, one at a time, on one of charlm's CPU recipes, each at the recipe's own wall time.

Each technique is a flag of `python -m charlm fit` (GPT's options, or Lightning's EMA callback). Equal wall time:
the cost of a training step of each technique is measured first, in this process, step by step in turn; one whose
cost differs from the recipe's by more than NOISE trains `recipe steps / its cost ratio` steps (its schedule fitted
to them), so all train for the same seconds. The runs alternate techniques within each seed; every seed gives every
technique the same data order, so the table's differences are paired by seed. Each run is a fresh process
(time_to_loss.py).

    python benchmarks/speedrun.py --data.path PATH/TO/input.txt                     # the default recipe, 3 seeds
    python benchmarks/speedrun.py --data.path PATH/TO/input.txt --recipe gpt-cpu-minute --seeds 1337

Prints a line per run as it ends, then the table (the val loss of each seed, the mean change from the recipe).
"""

import argparse
import inspect
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from charlm.data import CharDataModule

HERE = Path(__file__).parent
TECHNIQUES = {  # GPT's options, and "ema": the decay of Lightning's EMAWeightAveraging
    "the recipe as it is": {},
    "without QK-norm": {"qk_norm": False},
    "ReLU² MLP": {"mlp": "relu2"},
    "zero-init projections": {"zero_init": True},
    "logit soft-cap 15": {"logit_cap": 15.0},
    "value embeddings": {"value_embeds": True},
    "untied head": {"tie_embeddings": False},
    "EMA of the weights, decay 0.99": {"ema": 0.99},
}
NOISE = 0.05  # the same code measured twice by step_seconds differed by up to this much on the build machine


def fit_flags(options: dict) -> list[str]:
    flags = []
    for name, value in options.items():
        if name == "ema":
            callback = "lightning.pytorch.callbacks.EMAWeightAveraging"
            flags += [f"--trainer.callbacks+={callback}", "--trainer.callbacks.decay", str(value)]
        else:
            flags += [f"--model.net.init_args.{name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return flags


def step_seconds(names: list[str], batch_size: int, block_size: int, steps: int = 200) -> dict:
    """Seconds a training step of each technique takes here (forward, backward, Muon and AdamW, the EMA's update):
    in this process, one step of each technique in turn, the median of `steps` steps. A fit's step time varies from
    one process to the next by more than the techniques differ; step by step in turn, the drift is shared."""
    import torch
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from charlm.models import GPT
    from charlm.training import CharLM

    x = torch.randint(65, (batch_size, block_size))
    trained = {}
    for name in names:
        options = dict(TECHNIQUES[name])
        decay = options.pop("ema", None)
        model = CharLM(GPT(block_size=block_size, **options))
        ema = decay and AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        trained[name] = (model, model.make_optimizer(), ema)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(steps + 2):  # two to warm up
        for name, (model, optimizer, ema) in trained.items():
            start = time.perf_counter()
            _, loss = model.net(x, x)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if ema:
                ema.update_parameters(model)
            if i >= 2:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def run(text: Path, config: Path, flags: list[str]) -> tuple[float, float]:
    """(the final exact val loss, training seconds per step) of a fit with these flags."""
    command = [sys.executable, str(HERE / "time_to_loss.py"), "--config", str(config), "--target", "0"]
    command += ["--generation.max_new_tokens", "0"]  # no sample after each validation: it is not training
    result = subprocess.run([*command, "--data.path", str(text), *flags], capture_output=True, text=True)
    found = re.search(r"final val/loss ([\d.]+) at step", result.stdout)
    if not found:
        raise SystemExit(f"the run {' '.join(flags)} failed: {(result.stderr.strip() or 'no output').splitlines()[-1]}")
    rate = float(re.search(r"training ([\d,]+) tokens/s", result.stdout).group(1).replace(",", ""))
    shape = data_shape(config)
    return float(found.group(1)), shape["batch_size"] * shape["block_size"] / rate


def data_shape(config: Path) -> dict:
    """The batch_size and block_size a fit with this config trains with (CharDataModule's defaults, or the config's)."""
    shape = {k: v.default for k, v in inspect.signature(CharDataModule).parameters.items()}
    return shape | yaml.safe_load(config.read_text()).get("data", {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data.path", dest="text", type=Path, required=True, help="tiny-shakespeare's input.txt")
    parser.add_argument("--recipe", default="gpt-cpu", help="a config of configs/: gpt-cpu (the default) or another")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1, 2])
    parser.add_argument("--only", nargs="+", choices=list(TECHNIQUES), help="these techniques (and the recipe)")
    args = parser.parse_args()
    config = HERE.parent / f"configs/{args.recipe}.yaml"
    # a config other than gpt-cpu.yaml is read on top of it, as `fit --config` does
    trainer = yaml.safe_load((HERE.parent / "configs/gpt-cpu.yaml").read_text())["trainer"]
    trainer |= yaml.safe_load(config.read_text()).get("trainer", {})
    steps, validations = trainer["max_steps"], trainer["max_steps"] // trainer["val_check_interval"]
    names = ["the recipe as it is", *(n for n in TECHNIQUES if n in (args.only or TECHNIQUES) and TECHNIQUES[n])]
    shape = data_shape(config)
    costs = step_seconds(names, shape["batch_size"], shape["block_size"])
    for name in names:
        print(f"a step of {name}: {1000 * costs[name]:.1f} ms", flush=True)
    # a cost within NOISE of the recipe's is the recipe's: such a technique trains the recipe's steps
    ratio = {name: costs[name] / costs["the recipe as it is"] for name in names}
    fitted = {name: steps if abs(ratio[name] - 1) < NOISE else round(steps / ratio[name]) for name in names}
    losses: dict[str, list[float]] = {name: [] for name in names}
    measured: dict[str, list[float]] = {name: [] for name in names}
    for i, seed in enumerate(args.seeds):
        order = names[i % len(names) :] + names[: i % len(names)]  # each seed starts elsewhere: drift spreads evenly
        for name in order:
            n = fitted[name]
            flags = [f"--seed_everything={seed}", f"--trainer.max_steps={n}"]
            flags.append(f"--trainer.val_check_interval={max(1, n // validations)}")
            loss, seconds = run(args.text, config, [*flags, *fit_flags(TECHNIQUES[name])])
            losses[name].append(loss)
            measured[name].append(seconds)
            print(f"seed {seed}: {name}: {n} steps, {1000 * seconds:.1f} ms a step, val {loss:.4f}", flush=True)
    print(f"\n{args.recipe}.yaml ({steps} steps as it is), seeds {' '.join(map(str, args.seeds))}\n")
    print("| technique | ms a step (measured, in its runs) | steps at equal time | val loss by seed | mean change |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in names:
        change = statistics.mean(a - b for a, b in zip(losses[name], losses["the recipe as it is"]))
        ms = f"{1000 * costs[name]:.1f}, {1000 * statistics.median(measured[name]):.1f}"
        vals = " ".join(f"{v:.4f}" for v in losses[name])
        print(f"| {name} | {ms} | {fitted[name]} | {vals} | {change:+.4f} |")


if __name__ == "__main__":
    main()
