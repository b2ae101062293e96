import pytest
import torch

from charlm.checkpoints import load_net
from charlm.models import GPT, Bigram
from charlm.sampling import distribution, generate
from charlm.settings import Sampling


@pytest.fixture(params=["rope", "learned"])
def gpt(request) -> GPT:
    torch.manual_seed(0)
    return GPT(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=32, pos_emb=request.param).eval()


def tokens(net, idx, n: int, generator=None, use_cache: bool = True, **settings) -> torch.Tensor:
    return torch.cat(list(generate(net, idx, Sampling(max_new_tokens=n, **settings), generator, use_cache)), dim=1)


def test_cached_logits_equal_a_full_forward_pass(gpt):
    seq = torch.randint(20, (3, 16))
    full, _ = gpt(seq)
    gpt.set_kv_cache(batch_size=3)
    prefill, _ = gpt(seq[:, :5])
    steps = [gpt(seq[:, t : t + 1], pos=t)[0] for t in range(5, 16)]
    gpt.clear_kv_cache()
    cached = torch.cat([prefill, *steps], dim=1)
    assert (cached - full).abs().max().item() < 1e-5


def test_greedy_output_with_and_without_the_cache_is_identical_within_block_size(gpt):
    prompt = torch.randint(20, (2, 4))
    with_cache = tokens(gpt, prompt, 12, temperature=0)
    without = tokens(gpt, prompt, 12, temperature=0, use_cache=False)
    assert torch.equal(with_cache, without)
    assert all(block.attn.kv_cache is None for block in gpt.h)  # the cache is released after generation


def test_past_block_size_the_cache_slides_as_documented(gpt):
    """Hundreds of characters (some 60 re-fills of the cache), and every one is the argmax of a full forward pass
    over the documented context: the characters since the last re-fill, which starts from the last half of
    block_size characters."""
    prompt = torch.randint(20, (1, 10))
    out = tokens(gpt, prompt, 500, temperature=0)
    seq, context = prompt[0].tolist(), 10
    for t in range(500):
        expected = gpt(torch.tensor([seq[-context:]]))[0][0, -1].argmax().item()
        assert out[0, t].item() == expected, f"step {t}"
        seq.append(expected)
        context = context + 1 if context < 16 else 16 // 2


def test_sampling_is_seeded_and_works_for_the_bigram():
    torch.manual_seed(0)
    bigram = Bigram(vocab_size=20).eval()
    prompt = torch.zeros(1, 1, dtype=torch.long)

    def sample(seed):
        return tokens(bigram, prompt, 100, temperature=1.0, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))


def test_top_k_and_top_p_compose():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.05, 0.05]]))

    def picks(**kwargs):
        return set(distribution(logits, 1.0, **kwargs)[0].nonzero().flatten().tolist())

    assert picks(top_k=2) == {0, 1}
    assert picks(top_p=0.65) == {0, 1}  # 0.4 < 0.65, 0.4 + 0.3 reaches it
    assert picks(top_p=0.75) == {0, 1, 2}
    assert picks(top_k=2, top_p=0.3) == {0}
    assert picks(top_p=1e-300) == picks(top_p=1e-46) == {0}  # below float32's smallest: the most likely still stays
    assert picks() == {0, 1, 2, 3, 4}
    kept = distribution(logits, 1.0, top_k=3)[0]
    assert torch.allclose(kept[:3], torch.tensor([0.4, 0.3, 0.2]) / 0.9)  # what is kept is renormalised


def test_a_checkpoint_from_before_rotary_positions_still_loads(tmp_path):
    """Checkpoints saved before `pos_emb` existed have no such argument and hold learned position embeddings."""
    torch.manual_seed(0)
    old = GPT(vocab_size=20, block_size=16, n_layer=1, n_head=2, n_embd=32, pos_emb="learned").eval()
    init_args = {k: v for k, v in old.config.items() if k != "pos_emb"}
    ckpt = {
        "hyper_parameters": {"net": {"class_path": "charlm.models.GPT", "init_args": init_args}},
        "CharDataModule": {"chars": "abcdefghijklmnopqrst"},
        "state_dict": {f"net.{k}": v for k, v in old.state_dict().items()},
    }
    torch.save(ckpt, tmp_path / "old.ckpt")
    net, tokenizer = load_net(tmp_path / "old.ckpt")
    idx = torch.randint(20, (1, 16))
    assert torch.equal(net(idx)[0], old(idx)[0])
    assert tokenizer.vocab_size == 20


def test_a_context_of_one_character_samples_past_its_block_size():
    """block_size 1: every re-fill keeps the one last character, so each step sees exactly the previous one."""
    torch.manual_seed(0)
    net = GPT(vocab_size=20, block_size=1, n_layer=1, n_head=2, n_embd=16).eval()
    out = tokens(net, torch.tensor([[3]]), 50, temperature=0)
    seq = [3, *out[0].tolist()]
    assert all(seq[t + 1] == net(torch.tensor([[seq[t]]]))[0][0, -1].argmax().item() for t in range(50))
