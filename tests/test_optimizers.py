"""--model.optimizer muon: torch's Muon on the blocks' matrices and AdamW on the rest, as one optimizer that
Lightning's automatic optimization, the schedule, checkpoints and exact resume treat like AdamW."""

import pytest
import torch
from conftest import tiny

from charlm.__main__ import main
from charlm.models import GPT, Bigram
from charlm.optimizers import Muon, MuonAndAdamW
from charlm.training import CharLM

MUON = ["--model.optimizer", "muon", "--model.net.init_args.dropout", "0.1", "--generation.max_new_tokens", "0"]
ADAMW = ["--model.optimizer", "adamw"]
LAST = "checkpoints/gpt-cpu-plays/version_0/last.ckpt"


@pytest.mark.parametrize("options", [{}, dict(value_embeds=True, tie_embeddings=False, qk_norm=True)], ids=str)
def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(options):
    # the value embeddings, an untied head and the QK-norm gains are AdamW's: embeddings and vectors, not hidden maps
    model = CharLM(GPT(vocab_size=20, block_size=8, n_layer=2, n_head=2, n_embd=16, **options))  # Muon: the default
    optimizer = model.make_optimizer()
    muon = {id(p) for g in optimizer.parts["muon"].param_groups for p in g["params"]}
    named = dict(model.net.named_parameters())
    assert {name for name, p in named.items() if id(p) in muon} == {
        f"h.{i}.{m}.weight" for i in (0, 1) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    adamw = {id(p) for g in optimizer.parts["adamw"].param_groups for p in g["params"]}
    assert not muon & adamw and len(muon | adamw) == len(named)  # every weight once (a tied head is wte)
    assert optimizer.param_groups[0]["lr"] == 1e-2 and optimizer.param_groups[-1]["lr"] == 0.05
    with pytest.raises(ValueError, match="a Bigram has no hidden weight matrices: add --model.optimizer adamw"):
        CharLM(Bigram(20), optimizer="muon")


@pytest.mark.parametrize("adjust_lr_fn", ["original", "match_rms_adamw"])
def test_charlms_muon_updates_as_torchs_does(adjust_lr_fn):
    """charlm's Muon runs Newton-Schulz batched by shape and in float32 where torch's runs each matrix in bf16: the
    same update, to bf16's precision, for tall, wide and square matrices, two of each shape, with either of torch's
    learning-rate scalings."""
    shapes = [(48, 16), (16, 48), (16, 16)] * 2
    updates = []
    for optimizer in (torch.optim.Muon, Muon):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
        before = [p.detach().clone() for p in params]
        step = optimizer(params, lr=0.02, weight_decay=0.1, adjust_lr_fn=adjust_lr_fn)
        for _ in range(2):  # the second step goes through the momentum buffer
            for p in params:
                p.grad = torch.randn(p.shape)
            step.step()
        updates.append([p.detach() - b for p, b in zip(params, before)])
    for theirs, ours in zip(*updates):
        assert torch.nn.functional.cosine_similarity(theirs.flatten(), ours.flatten(), dim=0) > 0.99
        assert ours.norm() / theirs.norm() == pytest.approx(1, abs=0.02)


@pytest.mark.parametrize("net", [[], ["--model.net.init_args.tie_embeddings", "false"]], ids=["tied", "untied"])
def test_muon_trains_resumes_exactly_and_a_checkpoint_of_one_optimizer_is_refused_by_the_other(
    corpus, tmp_path, monkeypatch, net
):
    flags = ["fit", *tiny(corpus, max_steps=6), *MUON, *net]  # untied: the minute recipe's head
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    for cwd in (straight, stopped):
        cwd.mkdir()
    monkeypatch.chdir(straight)
    main(flags)
    ckpt = torch.load(straight / LAST, weights_only=True)
    assert isinstance(ckpt["optimizer_states"][0]["muon"]["state"][0]["momentum_buffer"], torch.Tensor)
    assert ckpt["lr_schedulers"][0]["base_lrs"] == [1e-2, 1e-2, 0.05]  # one schedule over both optimizers' groups
    monkeypatch.chdir(stopped)
    with pytest.raises(SystemExit) as exit_info:
        main([*flags, "--trainer.callbacks+=probes.InterruptAt"])  # SIGINT after step 3
    assert exit_info.value.code == 130
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *tiny(corpus, max_steps=6), *ADAMW, "--ckpt_path", "last"])  # from a Muon checkpoint
    assert str(exit_info.value.code).endswith(
        "was trained with --model.optimizer muon, this run's is adamw: resume with --model.optimizer muon, "
        "or start from its weights with --model.init_from"
    )
    main([*flags, "--ckpt_path", "last"])
    a, b = (torch.load(cwd / LAST, weights_only=True) for cwd in (straight, stopped))
    assert a["global_step"] == b["global_step"] == 6
    assert all(torch.equal(a["state_dict"][name], b["state_dict"][name]) for name in a["state_dict"])  # bitwise
    monkeypatch.chdir(tmp_path)
    main(["fit", *tiny(corpus, max_steps=2), *ADAMW, *net])
    with pytest.raises(SystemExit) as exit_info:
        main([*flags, "--ckpt_path", "last"])  # Muon, from an AdamW checkpoint
    assert "was trained with --model.optimizer adamw, this run's is muon" in str(exit_info.value.code)
    assert isinstance(CharLM(GPT(), optimizer="muon").make_optimizer(), MuonAndAdamW)
