"""Seeing how a GPT computes: what it would predict after each block (the logit lens), what each head does (named
from measurement), parts of it switched off (ablation), and how surprised it is by each character of a text.

All of it runs charlm's own GPT as it is, through forward hooks: no stored weight is ever changed.
"""

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.nn import functional as F

from charlm.models import GPT, Net

# what a head may be named for, each measured as the mean attention weight a character gives to that place
ROLES = {
    "previous character": "the character just before",
    "same position": "the character itself",
    "start of the word": "the first character of its word, when that lies further back than the previous one",
    "start of the line": "the first character of its line, when that lies further back than the previous one",
    "copying": "the character that followed an earlier occurrence of this one (an induction head)",
}
SPREAD = "spread out"  # no place takes DOMINANT of the weight: named with the largest score all the same
DOMINANT = 0.4


@torch.no_grad()
def lens(net: GPT, ids: list[int]) -> torch.Tensor:
    """(n_layer + 1, vocab_size) probabilities for the character after the last of `ids` (at most block_size of
    them): the residual stream after the embedding and after each block, through the final norm and the head. The
    last row is the model's own prediction."""
    streams = []
    hooks = [part.register_forward_hook(lambda m, i, out: streams.append(out)) for part in (net.drop, *net.h)]
    try:
        net(torch.tensor([ids], device=net.wte.weight.device))
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack([F.softmax(net.head(x[0, -1]).float(), dim=-1) for x in streams])


def windows(ids: list[int], block_size: int) -> Iterator[tuple[list[int], list[int]]]:
    """The text as validation reads it (data.ValidationWindows): consecutive windows of block_size characters, each
    predicting the next, so every character after the first is predicted once."""
    for start in range(0, len(ids) - 1, block_size):
        chunk = ids[start : start + block_size + 1]
        yield chunk[:-1], chunk[1:]


@torch.no_grad()
def surprise(net: Net, ids: list[int]) -> list[float]:
    """The loss in bits of each character after the first: how surprised the model was to read it."""
    device = next(net.parameters()).device
    bits = []
    for x, y in windows(ids, net.block_size):
        logits, _ = net(torch.tensor([x], device=device))
        losses = F.cross_entropy(logits[0].float(), torch.tensor(y, device=device), reduction="none")
        bits += (losses / math.log(2)).tolist()
    return bits


def check_parts(net: GPT, heads=(), attention=(), mlp=()) -> None:
    """Refuse, in one line, a head or a layer that the net does not have (naming none: any net, a bigram too)."""
    if not (heads or attention or mlp):
        return
    n_layer, n_head = net.config["n_layer"], net.config["n_head"]
    for layer, head in heads:
        if not (0 <= layer < n_layer and 0 <= head < n_head):
            raise ValueError(f"head {[layer, head]} is not one of this GPT's {n_layer} layers x {n_head} heads")
    for layer in (*attention, *mlp):
        if not 0 <= layer < n_layer:
            raise ValueError(f"layer {layer} is not one of this GPT's {n_layer} (from 0)")


@contextmanager
def switched_off(net: GPT, heads=(), attention=(), mlp=()) -> Iterator[None]:
    """The net with some heads ((layer, head) pairs), whole layers' attention or MLPs (layer numbers, from 0)
    contributing nothing to the residual stream, for as long as the block runs. Hooks, not weights: a head's output
    is zeroed before the attention's output projection. Naming nothing, it changes nothing, on any net."""
    check_parts(net, heads, attention, mlp)
    if not (heads or attention or mlp):
        yield
        return
    n_layer, n_head = net.config["n_layer"], net.config["n_head"]
    size = net.config["n_embd"] // n_head
    hooks = []

    def silence(layer_heads):
        def hook(module, args):
            y = args[0].clone()
            for head in layer_heads:
                y[..., head * size : (head + 1) * size] = 0
            return (y,)

        return hook

    for layer in range(n_layer):
        block = net.h[layer]
        off = [head for (at, head) in heads if at == layer]
        if off:
            hooks.append(block.attn.c_proj.register_forward_pre_hook(silence(off)))
        if layer in attention:
            hooks.append(block.attn.register_forward_hook(lambda m, i, out: torch.zeros_like(out)))
        if layer in mlp:
            hooks.append(block.mlp.register_forward_hook(lambda m, i, out: torch.zeros_like(out)))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def places(ids: torch.Tensor, starts: dict[str, set[int]]) -> dict[str, torch.Tensor]:
    """For each role, the position (T,) that each character of a window would attend to in it, or -1 where the role
    says nothing (its place is the previous character or the character itself, or there is none)."""
    T = ids.numel()
    here = torch.arange(T)
    out = {"previous character": torch.where(here >= 1, here - 1, -1), "same position": here}
    for role, separators in starts.items():  # the latest position at or before i that follows a separator
        follows = torch.tensor([i == 0 or ids[i - 1].item() in separators for i in range(T)])
        start = torch.where(follows, here, -1).cummax(dim=0).values
        out[role] = torch.where(start < here - 1, start, -1)
    return out


@torch.no_grad()
def roles(net: GPT, tokenizer, ids: list[int]) -> list[list[tuple[str, float, dict]]]:
    """What each head of each layer does over a text: (its role, the role's score, every role's score), where a
    score is the mean attention weight that a character gives to the role's place, over the characters that have
    one; a head whose best score is under DOMINANT is "spread out"."""
    known = [c for c in " \n\t" if not tokenizer.unknown(c)]  # a word starts after these, a line after a newline
    separators = {
        "word": {tokenizer.encode(c)[0] for c in known},
        "line": set(tokenizer.encode("\n" * ("\n" in known))),
    }
    sums = torch.zeros(net.config["n_layer"], net.config["n_head"], len(ROLES), dtype=torch.float64)
    counts = torch.zeros(len(ROLES), dtype=torch.float64)
    device = net.wte.weight.device
    for x, _ in windows(ids, net.block_size):
        if len(x) < 2:
            continue
        window = torch.tensor(x)
        weights = net.attention(window[None].to(device))[:, 0].double().cpu()  # (n_layer, n_head, T, T)
        targets = places(window, {"start of the word": separators["word"], "start of the line": separators["line"]})
        for r, role in enumerate(ROLES):
            if role == "copying":  # the position after each earlier occurrence of the character itself
                previous = torch.cat([torch.tensor([-1]), window[:-1]])
                mask = (previous[None, :] == window[:, None]) & torch.ones(len(x), len(x), dtype=torch.bool).tril(-1)
                sums[:, :, r] += (weights * mask).sum(dim=(-1, -2))
                counts[r] += mask.any(dim=1).sum()
                continue
            position = targets[role]
            valid = position >= 0
            picked = weights.gather(-1, position.clamp(min=0).expand(*weights.shape[:2], -1)[..., None])[..., 0]
            sums[:, :, r] += (picked * valid).sum(dim=-1)
            counts[r] += valid.sum()
    scores = sums / counts.clamp(min=1)
    names = list(ROLES)
    out = []
    for layer_scores in scores:
        row = []
        for head_scores in layer_scores:
            best = int(head_scores.argmax())
            score = round(float(head_scores[best]), 3)
            name = names[best] if score >= DOMINANT else SPREAD
            row.append((name, score, {n: round(float(s), 3) for n, s in zip(names, head_scores)}))
        out.append(row)
    return out
