import pytest
import torch

from charlm.models import GPT, Bigram, RowSplitLinear
from charlm.sampling import generate
from charlm.settings import Sampling


def tiny_gpt(**overrides) -> GPT:
    config = dict(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    return GPT(**(config | overrides))


# the speedruns' options (benchmarks/speedrun.py), each alone and all at once
OPTIONS = [
    dict(qk_norm=True),
    dict(mlp="relu2"),
    dict(zero_init=True),
    dict(logit_cap=2.0),
    dict(value_embeds=True),
    dict(tie_embeddings=False),
    dict(qk_norm=True, mlp="relu2", logit_cap=2.0, value_embeds=True, tie_embeddings=False, pos_emb="learned"),
]


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_every_option_is_causal_and_its_kv_cache_computes_what_the_whole_pass_does(options):
    torch.manual_seed(0)
    model = tiny_gpt(**options).eval()
    for block in model.h:  # zero_init's projections, moved off zero: the blocks must compute something
        torch.nn.init.normal_(block.attn.c_proj.weight, std=0.02)
        torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.02)
    idx = torch.randint(20, (2, 12))
    changed = idx.clone()
    changed[:, 7] = (idx[:, 7] + 1) % 20
    whole, whole_changed = model(idx)[0], model(changed)[0]
    assert torch.equal(whole[:, :7], whole_changed[:, :7]) and not torch.allclose(whole[:, 7:], whole_changed[:, 7:])
    model.set_kv_cache(batch_size=2)
    steps = [model(idx[:, :5])[0], *(model(idx[:, t : t + 1], pos=t)[0] for t in range(5, 12))]
    model.clear_kv_cache()
    assert (torch.cat(steps, dim=1) - whole).abs().max().item() < 1e-5


def test_zero_init_starts_every_block_as_the_identity():
    model = tiny_gpt(zero_init=True, pos_emb="learned")
    idx = torch.randint(20, (2, 16))
    assert torch.equal(model(idx)[0], model.head(model.wte(idx) + model.wpe(torch.arange(16))))
    assert not torch.equal(tiny_gpt(pos_emb="learned")(idx)[0], model(idx)[0])


def test_the_logit_cap_bounds_the_logits_however_large_the_weights():
    torch.manual_seed(0)
    idx = torch.randint(20, (2, 16))
    capped, free = tiny_gpt(logit_cap=2.0), tiny_gpt()
    for model in (capped, free):
        with torch.no_grad():
            model.wte.weight.mul_(100)
    assert capped(idx)[0].abs().max().item() <= 2 < 20 < free(idx)[0].abs().max().item()


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    torch.manual_seed(0)
    idx = torch.randint(20, (2, 16))
    for qk_norm in (True, False):
        model = tiny_gpt(qk_norm=qk_norm).eval()
        before = model(idx)[0]
        with torch.no_grad():
            for block in model.h:
                block.attn.c_attn.weight[:64].mul_(30)  # the rows that make queries and keys (n_embd 32 each)
        assert torch.allclose(model(idx)[0], before, atol=1e-4) == qk_norm


def test_an_untied_head_has_its_own_weight():
    model = tiny_gpt(tie_embeddings=False)
    assert model.lm_head.weight is not model.wte.weight
    assert {"wte.weight", "lm_head.weight"} <= set(model.state_dict())


@pytest.mark.parametrize("pos_emb", ["rope", "learned"])
def test_gpt_is_causal(pos_emb):
    torch.manual_seed(0)
    model = tiny_gpt(pos_emb=pos_emb).eval()
    idx = torch.randint(20, (2, 16))
    changed = idx.clone()
    changed[:, 9] = (idx[:, 9] + 1) % 20
    logits, _ = model(idx)
    logits_changed, _ = model(changed)
    assert torch.equal(logits[:, :9], logits_changed[:, :9])
    assert not torch.allclose(logits[:, 9:], logits_changed[:, 9:])


def test_rope_attention_depends_on_relative_positions_only():
    """With rotary positions, a sequence shifted to later positions gets the same logits (learned ones would not)."""
    torch.manual_seed(0)
    model = tiny_gpt(pos_emb="rope").eval()
    idx = torch.randint(20, (2, 10))
    at_zero = model(idx)[0]
    at_six = model(idx, pos=6)[0]  # the same characters at positions 6 .. 15
    assert (at_zero - at_six).abs().max().item() < 1e-5
    assert "wpe.weight" not in model.state_dict()  # nothing learned about positions, nothing saved


@pytest.mark.parametrize("pos_emb", ["rope", "learned"])
def test_attention_weights_are_those_of_the_forward_pass(pos_emb):
    torch.manual_seed(0)
    model = tiny_gpt(pos_emb=pos_emb, dropout=0.1)
    idx = torch.randint(20, (2, 16))
    weights = model.attention(idx)  # (n_layer, B, n_head, T, T), taken in eval mode
    assert weights.shape == (2, 2, 2, 16, 16)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 2, 2, 16))
    assert torch.all(weights.triu(1) == 0)  # causal: nothing from later characters
    assert model.training  # the mode and the fast path are back as they were
    assert all(not block.attn.keep_weights and block.attn.weights is None for block in model.h)

    # the written-out attention that keeps the weights computes what SDPA computes
    model.eval()
    fast = model(idx)[0]
    for block in model.h:
        block.attn.keep_weights = True
    assert (model(idx)[0] - fast).abs().max().item() < 1e-5
    assert torch.equal(torch.stack([block.attn.weights for block in model.h]), weights)


def test_the_cached_steps_give_the_same_logits_with_either_product_and_the_faster_is_measured_once():
    torch.manual_seed(0)
    model = tiny_gpt().eval()
    idx = torch.randint(20, (1, 12))
    whole = model(idx)[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model.set_kv_cache(batch_size=1)  # measures both products on the net's own cached steps
        measured = dict(model.split_is_faster)
        for split in (True, False):
            model.split_is_faster[2] = split  # as if measured so
            model.set_kv_cache(batch_size=1)
            assert all(m.split == split for m in model.modules() if isinstance(m, RowSplitLinear))
            steps = [model(idx[:, :5])[0], *(model(idx[:, t : t + 1], pos=t)[0] for t in range(5, 12))]
            assert (torch.cat(steps, dim=1) - whole).abs().max().item() < 1e-5
        model.clear_kv_cache()
    finally:
        torch.set_num_threads(threads)
    assert list(measured) == [2]
    assert not any(m.split for m in model.modules() if isinstance(m, RowSplitLinear))  # training products are plain


@pytest.mark.parametrize("options", [dict(pos_emb="learned"), dict(pos_emb="rope"), OPTIONS[-1]], ids=str)
def test_torch_compile_traces_the_gpt_training_pass_as_one_graph(options):
    # every graph break splits the compiled net into pieces that inductor cannot fuse across
    model = GPT(block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.1, **options)
    idx = torch.randint(0, 65, (4, 16))
    explained = torch._dynamo.explain(model.forward)(idx, idx)
    assert explained.graph_break_count == 0, [reason.reason.splitlines()[0] for reason in explained.break_reasons]
    assert explained.graph_count == 1


def test_lm_head_is_tied_to_token_embedding():
    model = tiny_gpt()
    assert model.lm_head.weight is model.wte.weight


@pytest.mark.parametrize("make_model", [lambda: Bigram(vocab_size=20), lambda: tiny_gpt()])
def test_models_overfit_a_tiny_sequence(make_model):
    torch.manual_seed(0)
    model = make_model()
    # a permutation of the vocabulary: each token fully determines the next, so even a bigram can learn it
    seq = torch.randperm(20).repeat(2)[None, :17]
    x, y = seq[:, :-1], seq[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2 if isinstance(model, GPT) else 1.0, weight_decay=0.0)
    for _ in range(200):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    out = torch.cat(list(generate(model.eval(), seq[:, :1], Sampling(max_new_tokens=15, temperature=0))), dim=1)
    assert torch.equal(out, seq[:, 1:16])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(n_embd=30, n_head=4), "not divisible by n_head"),
        (dict(dropout=1.0), "outside \\[0, 1\\)"),
        (dict(block_size=0), "block_size=0"),
        (dict(n_layer=-1), "n_layer=-1"),
        (dict(n_embd=30, n_head=2), "rope needs an even head size, n_embd / n_head = 15"),
        (dict(pos_emb="sinusoid"), "pos_emb='sinusoid' is not one of"),
        (dict(mlp="swish"), "mlp='swish' is not one of 'gelu', 'relu2'"),
        (dict(logit_cap=-1.0), "logit_cap=-1.0 must be >= 0"),
        (dict(logit_cap=float("nan")), "logit_cap=nan must be >= 0"),
    ],
)
def test_gpt_rejects_bad_hyperparameters(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_gpt(**overrides)
