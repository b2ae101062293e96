"""Characters per second of `charlm.sampling.generate`, with and without the GPT's KV cache.

The model is by default the GPT of configs/gpt.yaml (6 layers, 6 heads, 384 wide, and its options) at context 256
(the config's until 2026-11-22; it trains at 512 now), with random weights (speed does not depend on what was
learned). Without the cache, every step re-runs the last block_size characters, as nanoGPT's sample.py does; with
it, every step computes one position (plus a re-fill of the cache every block_size // 2 steps).

The two alternate, --rounds times (a shared machine's speed drifts within a minute); the speed-up is the ratio of
the medians.

    python benchmarks/generate_speed.py [--new_tokens 2000] [--rounds 3] [--device cpu]
    python benchmarks/generate_speed.py --n_layer 4 --n_head 4 --n_embd 128 --block_size 64   # nanoGPT CPU size
"""

import argparse
import platform
import resource
import statistics
import subprocess
import time
from pathlib import Path

import torch
import yaml

from charlm.models import GPT
from charlm.sampling import generate
from charlm.settings import Sampling


def chars_per_second(net: GPT, new_tokens: int, use_cache: bool, device: str) -> float:
    prompt = torch.zeros(1, 1, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    start = time.perf_counter()
    for _ in generate(net, prompt, Sampling(max_new_tokens=new_tokens, temperature=1.0), generator, use_cache):
        pass
    if device == "cuda":
        torch.cuda.synchronize()
    return new_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new_tokens", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    recipe = yaml.safe_load((Path(__file__).parent.parent / "configs/gpt.yaml").read_text())["model"]["net"]
    net_args = recipe["init_args"] | {"dropout": 0.0}
    for name in ("n_layer", "n_head", "n_embd"):
        parser.add_argument(f"--{name}", type=int, default=net_args[name])
    parser.add_argument("--block_size", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    sizes = dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size)
    net = GPT(vocab_size=65, **net_args | sizes).to(args.device).eval()
    chars_per_second(net, 50, True, args.device)  # warm up (and measure the faster single-position product)
    rates = {True: [], False: []}
    for _ in range(args.rounds):
        for use_cache in (True, False):
            rates[use_cache].append(chars_per_second(net, args.new_tokens, use_cache, args.device))
    print(f"GPT {sizes}, device {args.device} ({cpu_model()}), {torch.get_num_threads()} threads, {args.new_tokens} "
          f"new characters, {args.rounds} rounds alternating")  # fmt: skip
    cached, uncached = statistics.median(rates[True]), statistics.median(rates[False])
    print(f"without KV cache: {uncached:8.1f} chars/s  (rounds: {', '.join(f'{r:.1f}' for r in rates[False])})")
    print(f"with KV cache:    {cached:8.1f} chars/s  (rounds: {', '.join(f'{r:.1f}' for r in rates[True])})")
    print(f"speed-up:         {cached / uncached:8.1f}x  (medians)")
    split = net.split_is_faster.get(torch.get_num_threads())
    print(f"single-position products: {'row split' if split else 'plain'} (measured on the net's cached steps)")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


def cpu_model() -> str:
    """lscpu's model name, which says more than platform.processor() on Linux."""
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, StopIteration, subprocess.SubprocessError):
        return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
