"""Seconds from process start to the first training step of `python -m charlm fit`, for one or more source trees
(each put first on PYTHONPATH: this checkout's src/ and an older one's, say), alternating.

The first step is when charlm prints "charlm: training a ..." (on_train_start, right before the first batch); the
process is killed there. The text is prepared once beforehand, so every run finds it prepared, as a second run does.

    python benchmarks/startup.py --data.path input.txt [--trees src /tmp/old/src] [--repeats 5] [--python python]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time


def first_step(python: str, tree: str, text: str, folder: str) -> float:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
    command = [python, "-m", "charlm", "fit", "--data.path", text, "--trainer.max_steps", "1",
               "--trainer.enable_progress_bar", "false", "--generation.max_new_tokens", "0",
               "--trainer.logger", "false", "--checkpoint.dirpath", tempfile.mkdtemp(dir=folder)]  # fmt: skip
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for line in process.stderr:
        if line.startswith(b"charlm: training a "):
            seconds = time.perf_counter() - start
            process.kill()
            process.wait()
            return seconds
    raise RuntimeError(f"{tree}: the run ended before its first step (exit code {process.wait()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data.path", dest="text", required=True)
    parser.add_argument("--trees", nargs="+", default=["src"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()
    text = os.path.abspath(args.text)
    with tempfile.TemporaryDirectory() as folder:
        env = {**os.environ, "PYTHONPATH": os.path.abspath(args.trees[0])}
        subprocess.run([args.python, "-m", "charlm", "data", "--data.path", text], cwd=folder, env=env, check=True,
                       capture_output=True)  # fmt: skip
        times = {tree: [] for tree in args.trees}
        for _ in range(args.repeats):
            for tree in args.trees:
                times[tree].append(first_step(args.python, tree, text, folder))
    print(f"{args.python}: seconds from process start to the first training step, {args.repeats} runs alternating")
    for tree, seconds in times.items():
        rounds = ", ".join(f"{s:.2f}" for s in seconds)
        print(f"{tree:30} median {statistics.median(seconds):.2f}  min {min(seconds):.2f}  ({rounds})")


if __name__ == "__main__":
    main()
