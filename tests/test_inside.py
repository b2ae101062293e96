"""Seeing inside (charlm.inside) on models whose answer is known: a head set by hand, parts switched off, the lens,
a text's surprise against validate's loss."""

import math
import random
import re

import pytest
import torch
from conftest import tiny

from charlm import inside
from charlm.__main__ import main
from charlm.checkpoints import load_net
from charlm.data import CharDataModule
from charlm.models import GPT
from charlm.tokenizers import CharTokenizer

CHARS = "abcdefghij klmnop\nqr"


def test_a_head_set_by_hand_to_attend_to_the_previous_character_is_named_so():
    torch.manual_seed(0)
    # no QK-norm: the weights set below make the scores, whose scale QK-norm would take away
    net = GPT(vocab_size=20, block_size=16, n_layer=1, n_head=2, n_embd=32, pos_emb="learned", qk_norm=False).eval()
    with torch.no_grad():
        net.wte.weight.zero_()
        net.wpe.weight.copy_(torch.eye(16, 32))  # position p is the unit vector p
        weight = net.h[0].attn.c_attn.weight  # rows: queries, keys, values; head 0's are the first 16 of each
        weight[:16].zero_()
        weight[32:48].zero_()
        for row in range(15):
            weight[row, row + 1] = 50.0  # head 0's query at position p is unit vector p - 1...
        for row in range(16):
            weight[32 + row, row] = 1.0  # ...and its key at position p is unit vector p
    ids = torch.randint(20, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    ((first, second),) = inside.roles(net, CharTokenizer(CHARS), ids)
    assert first[0] == "previous character" and first[1] > 0.99
    assert second[0] != "previous character"  # the other head, left random, is not


def test_a_gpt_trained_to_copy_a_random_string_has_a_copying_head(tmp_path, monkeypatch):
    """Lines of a random string written twice: past the first half, each next character is the one that followed
    this character's earlier occurrence; 400 steps make a head that attends there."""
    rng = random.Random(0)

    def line() -> str:
        word = "".join(rng.choice("abcdefghijklmnopqrst") for _ in range(12))
        return f"{word} {word}\n"

    (tmp_path / "copy.txt").write_text("".join(line() for _ in range(4000)))
    monkeypatch.chdir(tmp_path)
    net = ["--model.net.n_layer", "2", "--model.net.n_head", "2", "--model.net.n_embd", "32"]
    run = ["--trainer.max_steps", "400", "--trainer.val_check_interval", "400", "--trainer.logger", "false"]
    quiet = ["--generation.max_new_tokens", "0", "--trainer.enable_progress_bar", "false"]
    main(["fit", "--data.path", "copy.txt", *net, *run, *quiet])
    net, tokenizer = load_net(next(tmp_path.glob("checkpoints/*/version_0/last.ckpt")))
    found = inside.roles(net, tokenizer, tokenizer.encode("".join(line() for _ in range(100))))
    assert max(score for row in found for role, score, _ in row if role == "copying") > 0.4, found


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A 2-layer GPT trained for 60 steps on the Shakespeare-like text, its tokenizer, the start of its validation
    text and its checkpoint."""
    cwd = tmp_path_factory.mktemp("inside")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        flags = [*tiny(corpus, max_steps=60), "--model.net.init_args.n_layer", "2"]
        flags += ["--trainer.val_check_interval", "60", "--generation.max_new_tokens", "0", "--trainer.logger", "false"]
        main(["fit", *flags])
    ckpt = next(cwd.glob("checkpoints/*/version_0/last.ckpt"))
    net, tokenizer = load_net(ckpt)
    return net, tokenizer, CharDataModule(str(corpus), block_size=32).val_data[:3000].tolist(), ckpt


def test_switching_nothing_off_changes_nothing_and_a_layers_heads_off_raise_the_loss(trained):
    net, _, val, _ = trained
    before = inside.surprise(net, val)
    with inside.switched_off(net):
        assert inside.surprise(net, val) == before  # bit-identical
    for layer in range(2):
        with inside.switched_off(net, heads=[(layer, 0), (layer, 1)]):
            assert sum(inside.surprise(net, val)) > sum(before)
        with inside.switched_off(net, attention=[layer]):  # the same as each of its heads off
            whole = inside.surprise(net, val)
        with inside.switched_off(net, heads=[(layer, 0), (layer, 1)]):
            assert inside.surprise(net, val) == pytest.approx(whole, abs=1e-5)
    assert inside.surprise(net, val) == before  # the hooks are gone, the weights as they were
    with pytest.raises(ValueError, match=r"head \[2, 0\] is not one of this GPT's 2 layers x 2 heads"):
        with inside.switched_off(net, heads=[(2, 0)]):
            pass


def test_the_lens_ends_in_the_models_own_prediction(trained):
    net, _, val, _ = trained
    capped = GPT(**net.config | dict(logit_cap=1.0, value_embeds=True))  # the head's cap is the lens's too
    capped.load_state_dict(net.state_dict(), strict=False)
    for model in (net, capped):
        rows = inside.lens(model, val[:32])
        assert rows.shape == (3, net.config["vocab_size"])  # the embedding, then each of 2 blocks
        prediction = torch.softmax(model(torch.tensor([val[:32]]))[0][0, -1], dim=-1)
        assert torch.allclose(rows[-1], prediction, atol=1e-6)
        assert torch.allclose(rows.sum(dim=-1), torch.ones(3))


def test_a_texts_surprise_is_validates_loss_on_it(trained, corpus, capsys):
    net, _, _, ckpt = trained
    main(["validate", *tiny(corpus), "--model.net.init_args.n_layer", "2", "--ckpt_path", str(ckpt)])
    loss = float(capsys.readouterr().out.split()[2])
    val = CharDataModule(str(corpus), block_size=32).val_data.tolist()
    bits = inside.surprise(net, val)
    assert len(bits) == len(val) - 1
    assert sum(bits) / len(bits) * math.log(2) == pytest.approx(loss, abs=1e-4)


def test_the_terminal_prints_the_heads_and_the_lens(trained, capsys, tmp_path):
    net, tokenizer, val, ckpt = trained
    text = tmp_path / "val.txt"
    text.write_text(tokenizer.decode(val))
    main(["attention", "--ckpt_path", str(ckpt), "--prompt_file", str(text), "--heads", "true"])
    table = capsys.readouterr().out
    assert "each head over 3,000 characters" in table
    rows = [line.split("│")[1:5] for line in table.splitlines() if re.match(r"│ \d", line)]
    expected = [(layer, head, role, score) for layer, row in enumerate(inside.roles(net, tokenizer, val))
                for head, (role, score, _) in enumerate(row)]  # fmt: skip
    assert len(rows) == len(expected) == 4
    for (layer, head, role, score), cells in zip(expected, rows):
        number, place, does, shown = (c.strip() for c in cells)  # a long role wraps: its first line is here
        assert (number, place, shown) == (str(layer + 1), str(head + 1), f"{score:.2f}") and role.startswith(does)
    main(["attention", "--ckpt_path", str(ckpt), "--prompt", "KING HENRY", "--lens", "true"])
    lens = capsys.readouterr().out
    assert "the embedding" in lens and "block 2" in lens and not (tmp_path / "attention.png").exists()
    with pytest.raises(SystemExit) as exit:
        main(["attention", "--ckpt_path", str(ckpt), "--heads", "true"])
    assert exit.value.code == "charlm: error: --heads and --lens look at a text: pass --prompt or --prompt_file"
