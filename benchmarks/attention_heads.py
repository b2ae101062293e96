"""What each attention head of a trained GPT looks at, on average over random windows of the validation split.

    python benchmarks/attention_heads.py --ckpt_path checkpoints/default/version_0/last.ckpt --data_path input.txt

For every layer and head it prints the mean attention weight that a character gives to itself, to the previous
character, to the last newline before that and to the last space before that (the start of its word); the last two
only where that newline or space lies further back than the previous character.
"""

import argparse

import numpy as np
import torch

from charlm.checkpoints import load_net
from charlm.data import CharDataModule


def last_position_of(idx: torch.Tensor, token: int) -> torch.Tensor:
    """For each position of idx (B, T), the latest position at or before it that holds `token`, or -1."""
    positions = torch.arange(idx.size(1)).expand_as(idx)
    return torch.where(idx == token, positions, -1).cummax(dim=1).values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_path", required=True, help="a GPT checkpoint")
    parser.add_argument("--data_path", help="the text it was trained on (default: tiny-shakespeare, downloaded)")
    parser.add_argument("--windows", type=int, default=200)
    parser.add_argument("--length", type=int, default=64, help="characters per window, at most the block size")
    args = parser.parse_args()

    net, tokenizer = load_net(args.ckpt_path)
    val = torch.from_numpy(CharDataModule(args.data_path).val_data.astype(np.int64))
    starts = torch.randint(len(val) - args.length, (args.windows,), generator=torch.Generator().manual_seed(0))
    idx = torch.stack([val[s : s + args.length] for s in starts.tolist()])  # (B, T)
    weights = net.attention(idx)  # (n_layer, B, n_head, T, T)

    here = torch.arange(args.length).expand_as(idx)
    targets = {
        "itself": (here, here >= 1),
        "previous": (here - 1, here >= 1),
        "last newline": (last_position_of(idx, tokenizer.stoi["\n"]), None),
        "last space": (last_position_of(idx, tokenizer.stoi[" "]), None),
    }
    print(f"{args.ckpt_path}: mean attention weight over {args.windows} windows of {args.length} characters")
    print("layer head  " + "  ".join(f"{name:>12}" for name in targets))
    for layer in range(weights.size(0)):
        for head in range(weights.size(2)):
            w = weights[layer, :, head]  # (B, T, T)
            means = []
            for position, valid in targets.values():
                valid = (position >= 0) & (position < here - 1) if valid is None else valid
                picked = w.gather(-1, position.clamp(min=0)[..., None])[..., 0]  # (B, T)
                means.append((picked * valid).sum() / valid.sum())
            print(f"{layer + 1:5} {head + 1:4}  " + "  ".join(f"{m:12.2f}" for m in means))


if __name__ == "__main__":
    main()
