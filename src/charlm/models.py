"""Character-level language models as plain nn.Modules: a bigram table and a GPT.

Both share one interface, `forward(idx, targets=None) -> (logits, loss)`; `charlm.sampling` generates from either.
Notable features of the GPT, following nanoGPT:
- pre-LayerNorm residual blocks, causal attention through `F.scaled_dot_product_attention` (flash kernels on a GPU);
- the LM head shares its weight with the token embedding (fewer parameters, better loss on short runs; optional);
- residual projections start smaller by 1/sqrt(2 * n_layer), per GPT-2, so the residual stream does not grow with depth;
- positions are learned embeddings (nanoGPT) or rotary embeddings (RoPE, `pos_emb="rope"`) that rotate queries and
  keys by their position, so attention scores depend on relative distance;
- QK-norm (on by default) and the other options of the 2026 speedruns, each a constructor argument;
- an opt-in key/value cache for generation (`set_kv_cache` / `clear_kv_cache`);
- `attention(idx)`: the attention weights of every layer and head, from the model's own forward pass.
Nothing here knows about Lightning, files or the command line.
"""

import math
import time
from typing import Literal

import torch
import torch.nn as nn
from torch.nn import functional as F

IGNORE_INDEX = -1  # targets with this value (padding of the last validation window) add nothing to the loss


class Net(nn.Module):
    """A charlm language model (the bigram or the GPT): the loss they share; subclasses implement `logits(idx, pos)`."""

    block_size: int  # the longest context the model can use
    config: dict  # the constructor arguments, so a checkpoint can rebuild the model

    def logits(self, idx: torch.Tensor, pos: int = 0) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, pos: int = 0):
        """Logits (B, T, vocab_size) for idx (B, T) and, given targets, the mean cross-entropy.

        `pos` is the position of idx[:, 0] in the sequence, used with the GPT's KV cache during generation.
        """
        logits = self.logits(idx, pos)
        if targets is None:
            return logits, None
        # float32 cross-entropy: under bf16 autocast the logits are bf16, and the loss is what we report
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        return logits, loss


class Bigram(Net):
    """The baseline: each character predicts the next from a vocab x vocab table of logits.

    Args:
        vocab_size: number of distinct characters (set from the data).
    """

    block_size = 1

    def __init__(self, vocab_size: int = 65):
        super().__init__()
        _check_positive(vocab_size=vocab_size)
        self.config = {"vocab_size": vocab_size}
        self.table = nn.Embedding(vocab_size, vocab_size)

    def logits(self, idx: torch.Tensor, pos: int = 0) -> torch.Tensor:
        return self.table(idx)


class RowSplitLinear(nn.Linear):
    """nn.Linear, with a second product for a single position on a CPU (generation with the KV cache).

    A matrix-vector product is bound by reading the weight from memory. Some BLAS libraries run it on one core (MKL
    on an AMD CPU); split into one block of rows per thread and batched (bmm), it runs on all of them. Others run it
    well on all cores themselves (MKL on an Intel CPU), and the split only adds work. Which is faster also depends on
    whether the weights stay in the CPU's cache from one step to the next (a small model's do, a big one's do not), so
    the GPT measures it on its own cached steps (`GPT.set_kv_cache`) and sets `split`. The same sums, in another order.
    """

    split = False  # set by GPT.set_kv_cache: the row split is the faster for this net, on this machine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split and x.device.type == "cpu" and x.shape[:-1].numel() == 1:
            parts = torch.get_num_threads()
            if self.weight.size(0) % parts == 0:
                return self.split_product(x, parts)
        return F.linear(x, self.weight, self.bias)

    def split_product(self, x: torch.Tensor, parts: int) -> torch.Tensor:
        rows, cols = self.weight.shape
        # the (cols, 1) column as a transposed row: with that layout, bmm runs its batch in parallel (measured)
        y = torch.bmm(self.weight.view(parts, rows // parts, cols), x.reshape(1, cols).T.expand(parts, -1, -1))
        y = y.reshape(*x.shape[:-1], rows)
        return y if self.bias is None else y + self.bias


def fastest(first, second, repeats: int = 15) -> bool:
    """Whether `first` runs faster than `second`: the best of `repeats` alternating timings of each."""
    best = [math.inf, math.inf]
    for _ in range(repeats):
        for i, f in enumerate((first, second)):
            start = time.perf_counter()
            f()
            best[i] = min(best[i], time.perf_counter() - start)
    return best[0] < best[1]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of x (B, nh, T, hs): channel pairs (i, i + hs/2) turn by angles that grow with the
    position; cos and sin are (T, hs), sin with its first half negated (saves negating x's second half)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat((x2, x1), dim=-1) * sin.to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool, qk_norm: bool):
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.c_attn = RowSplitLinear(n_embd, 3 * n_embd, bias=bias)  # query, key, value for all heads at once
        self.qk_norm = nn.RMSNorm(n_embd // n_head) if qk_norm else None  # one gain for queries and keys
        self.c_proj = RowSplitLinear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None  # set by GPT.set_kv_cache
        self.keep_weights = False  # set by GPT.attention: compute the weights explicitly and keep them
        self.weights: torch.Tensor | None = None  # (B, nh, T, S) from the last forward with keep_weights

    def forward(
        self,
        x: torch.Tensor,
        pos: int = 0,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        ve: torch.Tensor | None = None,
    ):
        B, T, C = x.size()
        nh = self.n_head
        qkv = self.c_attn(x).view(B, T, 3 * nh, C // nh).transpose(1, 2)  # (B, 3 nh, T, hs): q, k, v heads
        q, k, v = qkv.split(nh, dim=1)  # (B, nh, T, hs) each
        if self.qk_norm is not None or rope is not None:  # queries and keys in one op: less time than one each
            qk = qkv[:, : 2 * nh]
            if self.qk_norm is not None:
                qk = self.qk_norm(qk)
            if rope is not None:
                qk = rotate(qk, *rope)
            q, k = qk.split(nh, dim=1)
        if ve is not None:  # the value embedding of each character, (B, T, C), split into heads like the values
            v = v + ve.view(B, T, nh, C // nh).transpose(1, 2)
        if self.kv_cache is not None:  # x holds positions pos .. pos+T-1: store them, attend to all so far
            k_cache, v_cache = self.kv_cache
            k_cache[:B, :, pos : pos + T] = k
            v_cache[:B, :, pos : pos + T] = v
            k, v = k_cache[:B, :, : pos + T], v_cache[:B, :, : pos + T]  # (B, nh, S, hs)
        S = k.size(2)
        dropout = self.dropout if self.training else 0.0
        if self.keep_weights:  # what SDPA computes, written out, since SDPA does not return the weights
            visible = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))  # (B, nh, T, S)
            self.weights = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
            y = F.dropout(self.weights, dropout) @ v
        else:
            # query i sits at position S - T + i and sees keys 0 .. S - T + i; a single query sees every key
            mask = None if T in (1, S) else torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=T == S and T > 1
            )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float, bias: bool, activation: str):
        super().__init__()
        self.c_fc = RowSplitLinear(n_embd, 4 * n_embd, bias=bias)
        self.activation = nn.GELU() if activation == "gelu" else ReLU2()
        self.c_proj = RowSplitLinear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.activation(self.c_fc(x))))


class ReLU2(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool, qk_norm: bool, mlp: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias, qk_norm)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias, mlp)

    def forward(
        self,
        x: torch.Tensor,
        pos: int = 0,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        ve: torch.Tensor | None = None,
    ):
        x = x + self.attn(self.ln_1(x), pos, rope, ve)
        return x + self.mlp(self.ln_2(x))


class GPT(Net):
    """A decoder-only transformer over characters.

    Args:
        vocab_size: number of distinct characters (set from the data).
        block_size: the longest context, in characters (set from the data's block_size).
        n_layer: number of transformer blocks.
        n_head: attention heads per block; must divide n_embd.
        n_embd: width of the residual stream. The defaults make 0.1M parameters: at a budget of seconds a small, fast
            model learns more per second than a big one.
        dropout: dropout probability in [0, 1) on attention weights and residual branches; none by default, as the
            default run sees the corpus less than once (too little to overfit).
        bias: use biases in Linear and LayerNorm layers.
        pos_emb: "rope" rotary embeddings in attention (a lower loss at the same step), or "learned" position
            embeddings added to the input (nanoGPT).
        qk_norm: RMS-normalise each head's queries and keys (one learned gain) before attention (the speedruns):
            a lower val loss at the same wall time on the CPU recipes, though a step costs about 11% more.
        mlp: the MLP's activation: "gelu" (GPT-2), or "relu2", ReLU squared (the speedruns).
        zero_init: the blocks' output projections start at zero, so each block starts as the identity (the
            speedruns), instead of GPT-2's small random start.
        logit_cap: soft-cap the logits to (-cap, cap) with cap * tanh(logits / cap) (the speedruns use 15-30); 0
            turns it off.
        value_embeds: each block adds a learned embedding of each character to its attention's values (the
            speedruns' value embeddings).
        tie_embeddings: the LM head shares its weight with the token embedding (nanoGPT); false gives it its own.
    """

    def __init__(
        self,
        vocab_size: int = 65,
        block_size: int = 64,
        n_layer: int = 2,
        n_head: int = 4,
        n_embd: int = 64,
        dropout: float = 0.0,
        bias: bool = False,
        pos_emb: Literal["learned", "rope"] = "rope",
        qk_norm: bool = True,
        mlp: Literal["gelu", "relu2"] = "gelu",
        zero_init: bool = False,
        logit_cap: float = 0.0,
        value_embeds: bool = False,
        tie_embeddings: bool = True,
    ):
        super().__init__()
        _check_positive(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} is not divisible by n_head={n_head}: pick sizes where it is")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout={dropout} is outside [0, 1): use e.g. 0.0 or 0.2")
        if pos_emb not in ("learned", "rope"):
            raise ValueError(f"pos_emb={pos_emb!r} is not one of 'learned', 'rope'")
        if mlp not in ("gelu", "relu2"):
            raise ValueError(f"mlp={mlp!r} is not one of 'gelu', 'relu2'")
        if not logit_cap >= 0:
            raise ValueError(f"logit_cap={logit_cap} must be >= 0 (0 turns it off), e.g. 15")
        head_size = n_embd // n_head
        if pos_emb == "rope" and head_size % 2:
            raise ValueError(f"rope needs an even head size, n_embd / n_head = {head_size}: change n_embd or n_head")
        self.config = dict(
            vocab_size=vocab_size,
            block_size=block_size,
            n_layer=n_layer,
            n_head=n_head,
            n_embd=n_embd,
            dropout=dropout,
            bias=bias,
            pos_emb=pos_emb,
            qk_norm=qk_norm,
            mlp=mlp,
            zero_init=zero_init,
            logit_cap=logit_cap,
            value_embeds=value_embeds,
            tie_embeddings=tie_embeddings,
        )
        self.block_size = block_size
        self.split_is_faster: dict[int, bool] = {}  # thread count -> measured by set_kv_cache
        self.wte = nn.Embedding(vocab_size, n_embd)
        if pos_emb == "learned":
            self.wpe = nn.Embedding(block_size, n_embd)
        else:  # angle of channel pair i at position t: t / 10000^(2i / head_size); not saved, rebuilt from the config
            inv_freq = 10000.0 ** -(torch.arange(0, head_size, 2) / head_size)
            angles = torch.outer(torch.arange(block_size), inv_freq).repeat(1, 2)  # (block_size, head_size)
            self.register_buffer("rope_cos", angles.cos(), persistent=False)
            sin = angles.sin()
            sin[:, : head_size // 2] *= -1  # see rotate
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(Block(n_embd, n_head, dropout, bias, qk_norm, mlp) for _ in range(n_layer))
        # outside h: embeddings are AdamW's, not Muon's (optimizers.muon_matrices)
        self.vte = nn.ModuleList(nn.Embedding(vocab_size, n_embd) for _ in range(n_layer)) if value_embeds else None
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.wte.weight

        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight") and zero_init:
                nn.init.zeros_(p)
            elif name.endswith("c_proj.weight"):  # scaled init of residual projections, per GPT-2
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def logits(self, idx: torch.Tensor, pos: int = 0) -> torch.Tensor:
        B, T = idx.size()
        if pos + T > self.block_size:
            raise ValueError(f"positions {pos} .. {pos + T - 1} do not fit in block_size={self.block_size}")
        x = self.wte(idx)  # (B, T, n_embd)
        rope = None
        if self.config["pos_emb"] == "learned":
            x = x + self.wpe(torch.arange(pos, pos + T, device=idx.device))
        else:
            rope = (self.rope_cos[pos : pos + T], self.rope_sin[pos : pos + T])
        x = self.drop(x)
        for i, block in enumerate(self.h):
            x = block(x, pos, rope, None if self.vte is None else self.vte[i](idx))
        return self.head(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The logits (..., vocab_size) of residual-stream vectors x (..., n_embd): the final norm, the LM head and
        the soft cap."""
        logits = self.lm_head(self.ln_f(x))
        cap = self.config["logit_cap"]
        return cap * torch.tanh(logits / cap) if cap else logits

    @torch.no_grad()
    def attention(self, idx: torch.Tensor) -> torch.Tensor:
        """The attention weights (n_layer, B, n_head, T, T) of a forward pass over idx (B, T) in eval mode: in each
        (T, T) map, row i is how much the character at i attends to each character 0 .. i."""
        was_training = self.training
        self.eval()
        for block in self.h:
            block.attn.keep_weights = True
        try:
            self(idx)
            return torch.stack([block.attn.weights for block in self.h])
        finally:
            for block in self.h:
                block.attn.keep_weights, block.attn.weights = False, None
            self.train(was_training)

    def set_kv_cache(self, batch_size: int) -> None:
        """Keep each layer's keys and values for up to block_size positions, so that a forward pass at `pos`
        computes only the new positions. Generation only: clear it with `clear_kv_cache()` when done."""
        n_head, n_embd = self.config["n_head"], self.config["n_embd"]
        shape = (batch_size, n_head, self.block_size, n_embd // n_head)
        weight = self.wte.weight
        for block in self.h:
            block.attn.kv_cache = (weight.new_zeros(shape), weight.new_zeros(shape))
        threads = torch.get_num_threads()
        if batch_size == 1 and weight.device.type == "cpu" and threads > 1:
            if threads not in self.split_is_faster:
                self.split_is_faster[threads] = self.measure_split()
            self.use_split(self.split_is_faster[threads])

    def use_split(self, split: bool) -> None:
        """Whether every RowSplitLinear of the net runs single positions through the row split."""
        for layer in self.modules():
            if isinstance(layer, RowSplitLinear):
                layer.split = split

    def measure_split(self, steps: int = 8) -> bool:
        """Whether this net's cached steps run faster with RowSplitLinear's split: a few steps each way, alternating,
        in eval mode (no dropout draws from the generators); the cache's contents are written over by generation."""
        x = torch.zeros(1, 1, dtype=torch.long, device=self.wte.weight.device)
        was_training = self.training
        self.eval()

        def cached_steps(split: bool) -> None:
            self.use_split(split)
            for pos in range(min(steps, self.block_size)):
                self(x, pos=pos)

        try:
            with torch.no_grad():
                return fastest(lambda: cached_steps(True), lambda: cached_steps(False), repeats=3)
        finally:
            self.train(was_training)

    def clear_kv_cache(self) -> None:
        for block in self.h:
            block.attn.kv_cache = None
        self.use_split(False)


def _check_positive(**sizes: int) -> None:
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name}={value} must be a positive integer")
