"""Generation: temperature, top-k and top-p sampling and the KV-cache loop.

One implementation serves `python -m charlm generate` and the training-time samples.

Past block_size: the no-cache path (nanoGPT's sample.py) re-runs the last block_size characters at every step.
The cached path keeps the characters it has cached as the context; when the cache is full it keeps the last
block_size // 2 characters and re-fills the cache from them in one pass. So the context grows from half of
block_size to block_size and drops back, and each step costs one position, plus one re-fill every block_size // 2
steps.
"""

from collections.abc import Iterator

import torch
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from charlm.models import GPT, Net
from charlm.settings import Sampling

# attention kernels for generation: not cuDNN's, torch's first choice on an H100 (torch >= 2.10), which sets up a new
# execution graph for every new pair of query and key lengths, and every generation step brings a new key length
GENERATION_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def distribution(
    logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """The probabilities (B, vocab_size) that the next token is drawn from, for last-position logits (B, vocab_size)
    and a temperature above 0.

    top_k keeps the k most likely tokens, top_p the smallest set whose probability reaches p; both may be given.
    """
    # the largest logit becomes 0 first, and the temperature at least float32's smallest: divided by a tiny
    # temperature the others go to -inf, never inf - inf or 0 / 0 = NaN
    temperature = max(temperature, torch.finfo(torch.float32).tiny)
    logits = (logits.float() - logits.float().amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        probs, order = torch.sort(F.softmax(logits, dim=-1), descending=True)
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p  # the more likely tokens already reach p
        drop_sorted[:, 0] = False  # the most likely always stays: a p below float32's smallest rounds to 0
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return F.softmax(logits, dim=-1)


@torch.inference_mode()
def generate(
    net: Net,
    idx: torch.Tensor,
    settings: Sampling,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    with_probs: bool = False,
) -> Iterator[torch.Tensor] | Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield `settings.max_new_tokens` next-token ids (B, 1), one at a time, continuing idx (B, T), drawn as
    `settings` say (`generator`: seeded with `settings.seed` unless given; the prompt is already in idx).

    With use_cache (the default) the GPT computes one new position per step from its KV cache. With with_probs,
    yield (ids, probabilities (B, vocab_size)): the distribution each id was drawn from (for temperature 0, greedy,
    the model's own, whose most likely token it took).
    """
    block_size, temperature = net.block_size, settings.temperature
    if generator is None:
        generator = torch.Generator(device=idx.device).manual_seed(settings.seed)
    cached = use_cache and isinstance(net, GPT)
    window = idx[:, -block_size:]  # the context: for the cached path, exactly what is in the cache
    with sdpa_kernel(GENERATION_ATTENTION):
        if cached:
            net.set_kv_cache(idx.size(0))
        try:
            logits = net(window)[0][:, -1]
            for _ in range(settings.max_new_tokens):
                if temperature == 0:  # greedy
                    next_id = logits.argmax(dim=-1, keepdim=True)
                    probs = F.softmax(logits.float(), dim=-1) if with_probs else None
                else:
                    probs = distribution(logits, temperature, settings.top_k, settings.top_p)
                    next_id = torch.multinomial(probs, 1, generator=generator)
                yield (next_id, probs) if with_probs else next_id
                window = torch.cat((window, next_id), dim=1)
                if not cached:
                    window = window[:, -block_size:]
                    logits = net(window)[0][:, -1]
                elif window.size(1) <= block_size:
                    logits = net(next_id, pos=window.size(1) - 1)[0][:, -1]
                else:  # the cache is full: re-fill it from the most recent characters
                    window = window[:, -max(1, block_size // 2) :]  # block_size 1 keeps its one character
                    logits = net(window)[0][:, -1]
        finally:
            if cached:
                net.clear_kv_cache()
