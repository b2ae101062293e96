"""Milliseconds of one Muon step on the default model's block matrices: torch's `torch.optim.Muon` (each matrix on
its own, in bf16) against charlm's (`charlm.optimizers.Muon`: all matrices of a shape at once, float32 off a GPU), and
AdamW's fused step on the same matrices for scale. The three alternate, --rounds times; medians.

    python benchmarks/muon_step.py [--rounds 5] [--steps 100]
    python benchmarks/muon_step.py --n_layer 6 --n_embd 384      # configs/gpt.yaml's sizes
"""

import argparse
import statistics
import time

import torch
from generate_speed import cpu_model

from charlm.models import GPT
from charlm.optimizers import Muon, muon_matrices


def milliseconds(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], steps: int) -> float:
    for p in params:
        p.grad = torch.randn_like(p)
    for _ in range(5):  # warm up: the first steps allocate the momentum buffers
        optimizer.step()
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n_layer", type=int, default=2)
    parser.add_argument("--n_embd", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    net = GPT(vocab_size=65, block_size=64, n_layer=args.n_layer, n_head=4, n_embd=args.n_embd, bias=False)
    params = muon_matrices(net)
    optimizers = {
        "torch.optim.Muon": torch.optim.Muon(params, lr=0.02, weight_decay=0.0),
        "charlm's Muon": Muon(params, lr=0.02, weight_decay=0.0),
        "AdamW (fused)": torch.optim.AdamW(params, lr=1e-3, fused=True),
    }
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(args.rounds):
        for name, optimizer in optimizers.items():
            times[name].append(milliseconds(optimizer, params, args.steps))
    shapes = sorted({tuple(p.shape) for p in params})
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{len(params)} matrices of shapes {shapes}; medians of {args.rounds} rounds of {args.steps} steps")
    for name, values in times.items():
        print(f"  {name:18} {statistics.median(values):7.2f} ms a step")


if __name__ == "__main__":
    main()
