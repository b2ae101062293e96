"""The search for the GPU recipe: variants of configs/gpt.yaml side by side on one GPU, then the best one alone.

Phase 1 runs `time_to_loss.py --config configs/gpt.yaml --target 1.42` for every variant in VARIANTS at the same
time on the one GPU: their losses are exact and do not depend on that, their seconds and tokens/s are those of a
shared GPU. Phase 2 runs the variant that reached the target first (else the one with the lowest val loss) alone,
eager and with `--model.compile true`: those are the wall times and tokens/s to report. Every run stops after the
given minutes at most (Lightning's `--trainer.max_time`, with a last validation), so one GPU session's 10-minute
command holds the whole sweep with the defaults.

    python benchmarks/gpu_sweep.py --data.path input.txt [--minutes 4] [--solo_minutes 2] [flags for every run]
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

EMA = "--trainer.callbacks+=EMAWeightAveraging"
VARIANTS = {
    "gpt.yaml": [],
    "2000 steps": ["--trainer.max_steps", "2000"],
    "dropout 0.35": ["--model.net.init_args.dropout", "0.35"],
    "512 wide, 8 heads, dropout 0.35, 2000 steps": [
        "--model.net.init_args.dropout", "0.35", "--trainer.max_steps", "2000",
        "--model.net.init_args.n_embd", "512", "--model.net.init_args.n_head", "8",
    ],
    # validation and checkpoints use an exponential moving average of the weights (Lightning's callback); on the
    # CPU stand-in it helped the more the model overfit, so it is tried with less dropout too
    "EMA 0.995": [EMA, "--trainer.callbacks.decay=0.995"],
    "EMA 0.995, dropout 0.25": [EMA, "--trainer.callbacks.decay=0.995", "--model.net.init_args.dropout", "0.25"],
    # the CPU stand-in gained 0.035 from a 4x higher learning rate; on the GPU only 2e-3 at context 256 was tried
    "lr 1.5e-3": ["--model.lr", "0.0015", "--model.min_lr", "0.00015"],
}  # fmt: skip
TARGET = 1.42
CONFIG = Path(__file__).parent.parent / "configs/gpt.yaml"


def start(args, flags: list[str], minutes: float, log: Path, threads: int | None = None) -> subprocess.Popen:
    """Start time_to_loss.py on gpt.yaml with these flags, its output going into `log`."""
    seconds = round(minutes * 60)
    command = [
        sys.executable, str(Path(__file__).with_name("time_to_loss.py")), "--config", str(CONFIG),
        "--target", str(TARGET), "--data.path", args.data_path, *flags, *args.flags,
        "--trainer.max_time", f"00:00:{seconds // 60:02d}:{seconds % 60:02d}",
    ]  # fmt: skip
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    with open(log, "w") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)


def report(name: str, process: subprocess.Popen, log: Path) -> tuple[bool, float, float]:
    """Print a run's results; return (reached the target, seconds to it or else the lowest loss, the lowest loss)."""
    process.wait()
    output = log.read_text()
    summary = re.findall(r"^(?:  step|reached|did not|final|total|longest|peak) .*$", output, re.MULTILINE)
    print(f"=== {name} (exit {process.returncode})", *(summary if "final" in output else [output[-3000:]]), sep="\n")
    losses = [float(v) for v in re.findall(r"^  step .* val/loss (\d+\.\d+)$", output, re.MULTILINE)]
    reached = re.search(r"^reached .* ([\d.]+) s after process start", output, re.MULTILINE)
    lowest = min(losses, default=float("inf"))
    return reached is not None, float(reached.group(1)) if reached else lowest, lowest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data.path", dest="data_path", required=True, help="tiny-shakespeare's input.txt")
    parser.add_argument("--minutes", type=float, default=4.0, help="the most each side-by-side run may train")
    parser.add_argument("--solo_minutes", type=float, default=2.0, help="the most each run alone may train")
    args, args.flags = parser.parse_known_args()

    threads = max(1, (os.cpu_count() or 1) // len(VARIANTS))
    with tempfile.TemporaryDirectory() as tmp:
        logs = {name: Path(tmp, f"{i}.log") for i, name in enumerate(VARIANTS)}
        runs = {name: start(args, flags, args.minutes, logs[name], threads) for name, flags in VARIANTS.items()}
        results = {name: report(name, process, logs[name]) for name, process in runs.items()}
        print(f"\n| variant of configs/gpt.yaml, {len(runs)} side by side on one GPU | lowest exact val loss |")
        print("| --- | --- |")
        for name, (_, _, lowest) in results.items():
            print(f"| {name} | {lowest:.4f} |")

        best = min(results, key=lambda name: (not results[name][0], results[name][1]))
        for flags in ([], ["--model.compile", "true"]):
            name = f"{best}, alone on the GPU{', compiled' if flags else ''}"
            log = Path(tmp, "solo.log")
            report(name, start(args, VARIANTS[best] + flags, args.solo_minutes, log), log)


if __name__ == "__main__":
    main()
