"""charlm's Muon (torch's, its Newton-Schulz iteration batched by shape) and MuonAndAdamW, the pair that trains a
GPT as one optimizer: Muon on the blocks' matrices, AdamW on the rest."""

import math

import torch

from charlm.models import Net


def muon_matrices(net: Net) -> list[torch.Tensor]:
    """The weights Muon updates: the transformer blocks' matrices (not the embeddings or the tied head)."""
    return [p for name, p in net.named_parameters() if name.startswith("h.") and p.dim() == 2]


class Muon(torch.optim.Muon):
    """torch's Muon, its Newton-Schulz iteration run once for all matrices of a shape and in float32 off a GPU: on a
    CPU bf16 is emulated, and a small model's matrices one by one are bound by launches (benchmarks/README.md, Muon)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            updates = []
            for param in params:
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param.grad)
                buffer = state["momentum_buffer"]
                buffer.lerp_(param.grad, 1 - group["momentum"])
                updates.append(param.grad.lerp(buffer, group["momentum"]) if group["nesterov"] else buffer)
            for param, update in zip(params, orthogonalize(updates, group)):
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(update, alpha=-group["lr"] * lr_scale(group["adjust_lr_fn"], *param.shape))
        return loss


def lr_scale(adjust_lr_fn: str | None, rows: int, cols: int) -> float:
    """What torch's Muon multiplies the learning rate of a rows x cols matrix by, for its `adjust_lr_fn` (None or
    "original", or "match_rms_adamw": its constructor refuses others)."""
    if adjust_lr_fn == "match_rms_adamw":  # AdamW's lr and weight decay carry over
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1, rows / cols))


def orthogonalize(updates: list[torch.Tensor], group: dict) -> list[torch.Tensor]:
    """torch's quintic Newton-Schulz iteration (`torch.optim._muon`), batched over the matrices of each shape."""
    a, b, c = group["ns_coefficients"]
    wide = [u.mT if u.size(0) > u.size(1) else u for u in updates]  # iterate on X X^T, the smaller Gram matrix
    by_shape: dict[torch.Size, list[int]] = {}
    for i, x in enumerate(wide):
        by_shape.setdefault(x.shape, []).append(i)
    out: list[torch.Tensor] = [torch.empty(0)] * len(updates)
    for indices in by_shape.values():
        x = torch.stack([wide[i] for i in indices])
        x = x.to(torch.bfloat16 if x.is_cuda else torch.float32)
        x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=group["eps"])  # spectral norm at most 1
        for _ in range(group["ns_steps"]):
            gram = x @ x.mT
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        for i, orthogonal in zip(indices, x):
            out[i] = (orthogonal.mT if updates[i].size(0) > updates[i].size(1) else orthogonal).to(updates[i].dtype)
    return out


class MuonAndAdamW(torch.optim.Optimizer):
    """Muon and AdamW as one optimizer, as Lightning's automatic optimization needs: its param_groups are the two
    optimizers' own groups (AdamW's first: `train/lr` stays AdamW's), so the schedule, gradient clipping and
    checkpoints see every parameter."""

    def __init__(self, adamw: torch.optim.AdamW, muon: torch.optim.Muon):
        super().__init__([p for part in (adamw, muon) for g in part.param_groups for p in g["params"]], {})
        self.parts = {"adamw": adamw, "muon": muon}
        self.param_groups = [*adamw.param_groups, *muon.param_groups]  # the same dicts: the schedule sets both lrs

    def step(self, closure=None):
        loss = self.parts["adamw"].step(closure)  # the closure (forward and backward) runs once, before either update
        self.parts["muon"].step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts.values():
            part.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state_dict: dict) -> None:
        for name, part in self.parts.items():
            part.load_state_dict(state_dict[name])
        # torch's load_state_dict makes new group dicts: share those, or the schedule would set lrs nobody reads
        self.param_groups = [*self.parts["adamw"].param_groups, *self.parts["muon"].param_groups]
