"""How charlm's data handling scales: corpora of 1 to 500 MB and one with about 5,000 distinct characters.

    python benchmarks/data_scale.py --data.path input.txt                 # tiny-shakespeare, the source text
    python benchmarks/data_scale.py --data.path input.txt --sizes 1 10    # a quick look

Each corpus is tiny-shakespeare's paragraphs in a new random order, repeated to the size (the "wide" one also has 3%
of its characters replaced by one of 5,000 CJK characters), written into a temporary folder that is deleted at the
end. For each corpus, three runs of fresh processes, one after another:
- data setup: `CharDataModule(path)` in a new process, first with an empty cache (it prepares the corpus), then
  again (it opens the prepared files); the imports are timed apart;
- a real `python -m charlm fit --config configs/gpt-cpu.yaml` of 60 steps with one validation, on an empty cache:
  process start to the first training step, the validation pass (the loss over the validation windows, not the
  sample after it), training tokens/s (the median step, validation left out), and its peak RSS.
The corpus files were just written, so they are in the page cache: a colder disk adds its read time to the first run.
"""

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STEPS = 60


class Timings(L.Callback):
    """Added to the fit under test: writes when each training step started and how long each validation pass took."""

    def __init__(self, out: str):
        self.out = out
        self.step_starts: list[float] = []
        self.validations: list[float] = []
        self.validation_start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.step_starts.append(time.time())

    def on_validation_epoch_start(self, trainer, pl_module):
        self.validation_start = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.validations.append(time.perf_counter() - self.validation_start)

    def on_train_end(self, trainer, pl_module):
        from time_to_loss import process_start_time

        tokens = trainer.datamodule.batch_size * trainer.datamodule.block_size
        result = {"start": process_start_time(), "steps": self.step_starts, "validations": self.validations}
        Path(self.out).write_text(json.dumps(result | {"tokens_per_step": tokens}))


def make_corpus(source: str, path: Path, megabytes: float, wide: bool) -> None:
    paragraphs = source.split("\n\n")
    rng = random.Random(0)
    size, target = 0, int(megabytes * 1e6)
    with open(path, "w", encoding="utf-8") as f:
        while size < target:
            rng.shuffle(paragraphs)
            text = "\n\n".join(paragraphs) + "\n\n"
            if wide:  # 3% of the characters become one of 5,000 CJK characters
                points = np.frombuffer(text.encode("utf-32-le"), np.uint32).copy()
                chosen = np.random.default_rng(size).random(len(points)) < 0.03
                points[chosen] = 0x4E00 + np.random.default_rng(size + 1).integers(0, 5000, chosen.sum())
                text = points.tobytes().decode("utf-32-le")
            f.write(text)
            size += len(text.encode("utf-8"))


def run(command: list[str], cwd: Path, env: dict) -> tuple[str, float]:
    """Run a command; its stdout and its peak RSS in MiB."""
    with tempfile.TemporaryFile("w+") as out:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        out.seek(0)
        output = out.read()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"data_scale.py: {' '.join(command)} failed:\n{output[-3000:]}")
    return output, usage.ru_maxrss / 1024


SETUP = """
import time; t0 = time.perf_counter()
from charlm.data import CharDataModule
t1 = time.perf_counter(); dm = CharDataModule({path!r}, cache_dir={cache!r}); t2 = time.perf_counter()
print(f"RESULT {{t1 - t0}} {{t2 - t1}} {{len(dm.train_data)}} {{len(dm.val_window) - 1}} {{dm.vocab_size}}")
"""


def measure(path: Path, work: Path, env: dict) -> dict:
    cache = work / "cache"
    times = []
    for _ in range(2):  # an empty cache, then the prepared one
        output, rss = run([sys.executable, "-c", SETUP.format(path=str(path), cache=str(cache))], work, env)
        times.append((output.split("RESULT ")[1].split(), rss))
    shutil.rmtree(cache)
    (imports, first, train, val, vocab), first_rss = times[0]
    cached, cached_rss = times[1][0][1], times[1][1]
    timings = work / "timings.json"
    fit = [sys.executable, "-m", "charlm", "fit", "--config", str(ROOT / "configs/gpt-cpu.yaml")]
    fit += ["--data.path", str(path), "--data.cache_dir", str(cache), "--trainer.max_steps", str(STEPS)]
    fit += ["--trainer.val_check_interval", str(STEPS // 2), "--trainer.enable_progress_bar", "false"]
    fit += ["--checkpoint.dirpath", str(work / "ckpt"), "--trainer.logger.init_args.save_dir", str(work / "logs")]
    fit += ["--generation.max_new_tokens", "0", "--trainer.callbacks+=data_scale.Timings"]
    fit += ["--trainer.callbacks.out", str(timings)]
    _, fit_rss = run(fit, work, env)
    shutil.rmtree(cache)
    shutil.rmtree(work / "ckpt")
    result = json.loads(timings.read_text())
    steps = result["steps"]
    step_time = statistics.median(b - a for a, b in zip(steps, steps[1:]))  # the one validation does not move it
    return {
        "size": path.stat().st_size,
        "vocab": int(vocab),
        "train": int(train),
        "val": int(val),
        "imports": float(imports),
        "first_setup": float(first),
        "cached_setup": float(cached),
        "to_first_step": steps[0] - result["start"],
        "validation": max(result["validations"]),
        "tokens_per_s": result["tokens_per_step"] / step_time,
        "peak_rss": max(first_rss, cached_rss, fit_rss),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data.path", dest="source", required=True, help="tiny-shakespeare's input.txt")
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 10, 100, 500], help="corpus sizes in MB")
    parser.add_argument("--wide", type=float, default=50, help="size in MB of the 5,000-character corpus (0: none)")
    args = parser.parse_args()
    source = Path(args.source).read_text(encoding="utf-8")
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")])}
    corpora = [(size, False) for size in args.sizes] + ([(args.wide, True)] if args.wide else [])
    header = (
        "| corpus | vocabulary | training / validated tokens | imports | first-run data setup | cached data setup "
        "| process start to first step (first run) | one validation pass | training tokens/s | peak RSS |"
    )
    print(header)
    print("|" + " --- |" * header.count(" | ") + " --- |")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for megabytes, wide in corpora:
            path = work / f"corpus-{megabytes:g}mb{'-wide' if wide else ''}.txt"
            make_corpus(source, path, megabytes, wide)
            r = measure(path, work, env)
            path.unlink()
            name = f"{r['size'] / 1e6:,.0f} MB" + (" (5,000 characters)" if wide else "")
            print(
                f"| {name} | {r['vocab']:,} | {r['train']:,} / {r['val']:,} | {r['imports']:.2f} s "
                f"| {r['first_setup']:.2f} s | {r['cached_setup']:.3f} s | {r['to_first_step']:.1f} s "
                f"| {r['validation']:.2f} s | {r['tokens_per_s']:,.0f} | {r['peak_rss']:,.0f} MiB |",
                flush=True,
            )


if __name__ == "__main__":
    main()
