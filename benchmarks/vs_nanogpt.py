"""charlm against nanoGPT itself on a CPU, back to back on one machine: wall seconds from process start to val loss
1.88, and charlm's best exact val loss within the wall time nanoGPT's run took.

Rows, each a fresh process, one after the other:
1. nanoGPT with its README's CPU command (a checkout given by --nanogpt, copied to a temporary folder with the text
   as its data/shakespeare_char/input.txt and prepared there); its time to 1.88 is its own estimate's (20 batches),
   or where that ends just above (1.8857, "a loss of only 1.88" in its README), the end of its run;
2. charlm's default recipe, `python -m charlm fit` (exact validation over the whole validation split);
3. the default before Muon and QK-norm, AdamW for 700 steps (`--model.optimizer adamw --model.net.init_args.qk_norm
   false --trainer.max_steps 700`);
4. configs/gpt-cpu-minute.yaml (the default's model, tuned for a minute) fitted to nanoGPT's wall time:
   --trainer.max_steps from its own step time, measured by a short probe run of it (a step at context 128 costs
   more than the default's at 64 on some CPUs), so its whole schedule, startup and validations included, ends
   inside that time.

    python benchmarks/vs_nanogpt.py --nanogpt PATH/TO/nanoGPT --data.path PATH/TO/tinyshakespeare/input.txt
"""

import argparse
import importlib.util
import inspect
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from charlm.data import CharDataModule

TARGET = 1.88
NANOGPT_CPU = [  # nanoGPT's README, "I only have a macbook" (and any other CPU)
    "config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1",
    "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
    "--lr_decay_iters=2000", "--dropout=0.0",
]  # fmt: skip
HERE = Path(__file__).parent


NANOGPT_NEEDS = ("numpy", "requests")  # what its prepare.py and train.py import besides torch


def nanogpt(checkout: Path, text: Path) -> tuple[float | None, float, float]:
    """(seconds to val loss <= TARGET or None, the final val loss, the whole run's seconds) of nanoGPT's CPU run."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp, "nanoGPT")
        shutil.copytree(checkout, copy, ignore=shutil.ignore_patterns(".git", "out-*"))
        shutil.copy(text, copy / "data/shakespeare_char/input.txt")  # prepare.py downloads it otherwise
        subprocess.run([sys.executable, "data/shakespeare_char/prepare.py"], cwd=copy, check=True, capture_output=True)
        start, reached, last = time.time(), None, float("nan")
        process = subprocess.Popen(
            [sys.executable, "train.py", *NANOGPT_CPU],
            cwd=copy,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for line in process.stdout:
            found = re.match(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", line)
            if found:
                last = float(found.group(2))
                print(
                    f"  nanoGPT step {found.group(1)}: val loss {last:.4f} at {time.time() - start:.1f} s", flush=True
                )
                if reached is None and last <= TARGET:
                    reached = time.time() - start
        if process.wait():
            raise SystemExit(f"nanoGPT's run failed (exit {process.returncode})")
        if reached is None and last < TARGET + 0.01:  # its README's "a loss of only 1.88": its last estimate
            reached = time.time() - start
        return reached, last, time.time() - start


def charlm(text: Path, *flags: str, config: str = "gpt-cpu") -> tuple[float | None, float, float, int, float]:
    """The same three numbers for `python -m charlm fit`, from time_to_loss.py (exact validation; the clock starts
    with the process), the steps it trained and its training tokens/s."""
    command = [sys.executable, str(HERE / "time_to_loss.py"), "--config", str(HERE.parent / f"configs/{config}.yaml")]
    result = subprocess.run(
        [*command, "--target", str(TARGET), "--data.path", str(text), *flags], capture_output=True, text=True
    )
    if result.returncode and "did not reach" not in result.stdout:  # exit 1 also says the target was not reached
        raise SystemExit(f"charlm's run failed: {result.stderr.strip().splitlines()[-1]}")
    reached = re.search(r"reached val/loss <= [\d.]+ at step \d+, ([\d.]+) s after process start", result.stdout)
    final, step = re.search(r"final val/loss ([\d.]+) at step (\d+)", result.stdout).groups()
    total, rate = re.search(r"total ([\d.]+) s, training ([\d,]+) tokens/s", result.stdout).groups()
    return (
        (float(reached.group(1)) if reached else None),
        float(final),
        float(total),
        int(step) + 1,
        float(rate.replace(",", "")),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanogpt", type=Path, required=True, help="a checkout of karpathy/nanoGPT")
    parser.add_argument("--data.path", dest="text", type=Path, required=True, help="tiny-shakespeare's input.txt")
    args = parser.parse_args()
    missing = [name for name in NANOGPT_NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        names = " ".join(missing)
        raise SystemExit(f"nanoGPT's scripts import {names}, which this Python lacks: pip install {names}")
    if not (args.nanogpt / "train.py").is_file():
        raise SystemExit(f"--nanogpt {args.nanogpt} holds no train.py: pass a checkout of karpathy/nanoGPT")
    rows = {"nanoGPT, its README's CPU command": nanogpt(args.nanogpt, args.text.resolve())}
    rows["charlm fit (the default recipe)"] = default = charlm(args.text)
    previous = ["--model.optimizer", "adamw", "--model.net.init_args.qk_norm", "false", "--trainer.max_steps", "700"]
    previous += ["--trainer.val_check_interval", "350"]
    rows["charlm fit " + " ".join(previous)] = charlm(args.text, *previous)
    budget = rows["nanoGPT, its README's CPU command"][2]
    probe_steps = 100  # the minute recipe's own step time, and its startup and one validation
    probe = charlm(args.text, "--trainer.max_steps", str(probe_steps), "--trainer.val_check_interval",
                   str(probe_steps), config="gpt-cpu-minute")  # fmt: skip
    data = inspect.signature(CharDataModule).parameters  # the same characters a step as the default's batch shape
    step_seconds = data["block_size"].default * data["batch_size"].default / probe[4]
    overhead = probe[2] - probe_steps * step_seconds  # startup, one validation, the sample
    # the fitted run validates twice: one more validation's worth; and 15% to spare, as the probe's median step runs
    # faster than a long run's mean (a 10% spare overran nanoGPT's 128.3 s by 0.7 s on AMD)
    steps = int(0.85 * (budget - 2 * overhead) / step_seconds)
    name = (
        f"charlm fit --config configs/gpt-cpu-minute.yaml --trainer.max_steps {steps} (to fit nanoGPT's {budget:.0f} s)"
    )
    rows[name] = charlm(
        args.text,
        "--trainer.max_steps",
        str(steps),
        "--trainer.val_check_interval",
        str(steps // 2),
        config="gpt-cpu-minute",
    )
    print(f"\n| run | seconds to val loss {TARGET} | final val loss | seconds in all |")
    print("| --- | ---: | ---: | ---: |")
    for name, (reached, final, total, *_) in rows.items():
        print(f"| {name} | {'not reached' if reached is None else f'{reached:.1f}'} | {final:.4f} | {total:.1f} |")
    nano = rows["nanoGPT, its README's CPU command"][0]
    if nano and default[0]:
        print(f"\nthe default reached {TARGET} {nano / default[0]:.1f}x sooner than nanoGPT")
    _, final, total, *_ = rows[name]
    within = "within" if total <= budget else f"in {total:.1f} s, not within"
    print(f"charlm's exact val loss {within} nanoGPT's {budget:.1f} s: {final:.4f}")


if __name__ == "__main__":
    main()
