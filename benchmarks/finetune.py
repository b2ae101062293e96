"""Fine-tuning against training from scratch, on a small English text that is not Shakespeare.

Pretrains the default recipe (`python -m charlm fit`) on tiny-shakespeare, or reuses a given checkpoint, then trains
on the small text for the same number of steps twice, with the same flags: (a) from scratch, (b) with
`--model.init_from` the pretrained checkpoint. Each run is a fresh `python -m charlm` process in a temporary folder;
its wall time counts from launch to exit. The best exact val loss is the lowest `val/loss` TensorBoard holds.

The small text is, by default, a slice of the Jargon File (public domain), which Debian's `dict-jargon` package
installs; the script installs it with apt-get when it is missing. It is read from there, never kept.

    python benchmarks/finetune.py --data.path ../shared/data/tinyshakespeare/input.txt
    python benchmarks/finetune.py --pretrained checkpoints/default/version_0 --trainer.max_steps 300
"""

import argparse
import gzip
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

JARGON = Path("/usr/share/dictd/jargon.dict.dz")  # dictzip: gzip that the gzip module reads


def jargon_slice(chars: int) -> str:
    """`chars` characters of Jargon File entries from the middle of the lexicon, cut at a blank line."""
    if not JARGON.is_file():
        subprocess.run(["apt-get", "install", "-y", "-qq", "dict-jargon"], check=True, capture_output=True)
    text = gzip.decompress(JARGON.read_bytes()).decode("utf-8")
    start = text.index("\n\n", len(text) // 3) + 2
    return text[start : text.rindex("\n\n", start, start + chars) + 1]


def fit(cwd: Path, *flags: str) -> tuple[float, tuple[int, float], float]:
    """Run `python -m charlm fit` in cwd: its wall seconds, (step, best val loss) and last val loss."""
    began = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "charlm", "fit", *flags], cwd=cwd, capture_output=True, text=True)
    seconds = time.monotonic() - began
    if result.returncode:
        sys.exit(f"finetune.py: charlm fit {' '.join(flags)} failed:\n{result.stderr[-2000:]}")
    (log_dir,) = Path(cwd, "logs").glob("*/version_*")
    events = EventAccumulator(str(log_dir))
    events.Reload()
    val = [(e.step + 1, e.value) for e in events.Scalars("val/loss")]  # logged at the step before: the steps done
    return seconds, min(val, key=lambda point: point[1]), val[-1][1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data.path", dest="shakespeare", help="tiny-shakespeare, to pretrain on")
    parser.add_argument("--pretrained", help="a checkpoint to start from instead of pretraining")
    parser.add_argument("--text", help="the small text (default: a slice of the Jargon File)")
    parser.add_argument("--chars", type=int, default=80_000, help="characters of the Jargon File to take")
    args, flags = parser.parse_known_args()
    if not args.pretrained and not args.shakespeare:
        sys.exit("finetune.py: pass --data.path tiny-shakespeare to pretrain on, or --pretrained CKPT")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        text = tmp / "small.txt"
        text.write_text(Path(args.text).read_text() if args.text else jargon_slice(args.chars))
        pretrained = Path(args.pretrained).absolute() if args.pretrained else None
        rows = []
        if pretrained is None:
            (tmp / "pretrain").mkdir()
            seconds, best, _ = fit(tmp / "pretrain", "--data.path", str(Path(args.shakespeare).absolute()))
            pretrained = tmp / "pretrain/checkpoints"
            rows.append(("pretrain: default recipe, tiny-shakespeare", seconds, best, None))
        for name, extra in (("(a) from scratch", []), ("(b) --model.init_from pretrained", ["--model.init_from"])):
            cwd = tmp / name[1]
            cwd.mkdir()
            start = [*extra, str(pretrained)] if extra else []
            seconds, best, last = fit(cwd, "--data.path", str(text), *start, *flags)
            rows.append((f"{name} {' '.join(flags)}".strip(), seconds, best, last))
            shutil.rmtree(cwd / "checkpoints")
        characters = len(text.read_text())
    print(f"\nsmall text: {characters:,} characters ({args.text or 'the Jargon File'}); validation of its last 10%")
    print("| run | wall | best exact val loss (step) | last val loss |\n| --- | --- | --- | --- |")
    for name, seconds, (step, best), last in rows:
        print(f"| {name} | {seconds:.1f} s | {best:.4f} ({step}) | {'' if last is None else f'{last:.4f}'} |")
    (_, _, (_, scratch), _), (_, _, (_, tuned), _) = rows[-2:]
    print(f"fine-tuning is {scratch - tuned:.4f} lower than from scratch at the same steps (target: >= 0.15)")


if __name__ == "__main__":
    main()
