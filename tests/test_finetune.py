"""Fine-tuning: `fit --model.init_from CKPT` starts a new run on another text from a trained model's weights."""

import random

import pytest
import torch
import yaml
from conftest import ROOT, scalars, tiny

from charlm import checkpoints, resume
from charlm.__main__ import main
from charlm.models import GPT, Bigram
from charlm.tokenizers import ByteTokenizer, CharTokenizer


@pytest.fixture(scope="module")
def pretrained(corpus, tmp_path_factory):
    """The run folder of a tiny GPT with learned positions, trained for 4 steps on the Shakespeare-like corpus."""
    cwd = tmp_path_factory.mktemp("pretrained")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        main(["fit", *tiny(corpus), "--model.net.init_args.pos_emb", "learned", "--generation.max_new_tokens", "0"])
    return cwd / "checkpoints/gpt-cpu-plays/version_0"


@pytest.fixture(scope="module")
def mine(tmp_path_factory):
    """Someone's own small text: English, with characters the corpus never has (digits, brackets, an accent)."""
    rng = random.Random(1)
    words = "the cat sat on a mat while my café served 42 cups of tea (hot) and {cold} water at 9:15".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 12))) + "." for _ in range(200)]
    path = tmp_path_factory.mktemp("mine") / "notes.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def fine_tune(pretrained, mine, *extra) -> list[str]:
    """What a person types: the checkpoint and the text, no architecture; a few steps."""
    return [
        "fit", "--model.init_from", str(pretrained), "--data.path", str(mine),
        "--data.batch_size", "16",
        "--trainer.max_steps", "6",
        "--trainer.val_check_interval", "3",
        "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false",
        "--generation.max_new_tokens", "10",
        *extra,
    ]  # fmt: skip


def test_init_from_starts_a_new_run_at_step_0_with_the_checkpoints_net(pretrained, mine, corpus, tmp_path, capsys):
    main(fine_tune(pretrained, mine))
    err = capsys.readouterr().err
    chars = "".join(sorted(set(mine.read_text())))
    new = sorted(set(chars) - set(corpus.read_text()))
    assert new == ["(", ")", "1", "2", "4", "5", "9", "{", "}", "é"]
    assert (
        f"charlm: starting from {pretrained}/last.ckpt (step 4): {len(new)} of this text's {len(chars)} characters "
        f"are new to it and start untrained: {' '.join(new)}\n"
    ) in err
    ckpts, logs = tmp_path / "checkpoints/default-notes/version_0", tmp_path / "logs/default-notes/version_0"
    ckpt = torch.load(ckpts / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6  # its own steps, not the checkpoint's 4 and more
    assert (
        float(ckpt["optimizer_states"][0]["adamw"]["state"][0]["step"]) == 6
    )  # a fresh optimizer: its moments are its own
    assert ckpt["hyper_parameters"]["init_from"] == str(pretrained / "last.ckpt")
    net = ckpt["hyper_parameters"]["net"]["init_args"]
    assert net | {"n_layer": 1, "n_embd": 32, "block_size": 32, "pos_emb": "learned", "vocab_size": len(chars)} == net
    assert ckpt["CharDataModule"]["chars"] == chars
    config = yaml.safe_load((logs / "config.yaml").read_text())
    assert config["model"]["init_from"] == str(pretrained / "last.ckpt")
    assert config["model"]["net"]["init_args"]["n_layer"] == 1 and config["data"]["block_size"] == 32
    assert [step for step, _ in scalars(logs)["train/loss"]] == [0, 1, 2, 3, 4, 5]

    # a normal checkpoint: scored and sampled with no word about its architecture
    main(["validate", "--data.path", str(mine), "--ckpt_path", "last"])
    assert capsys.readouterr().out.startswith("val loss ")
    main(["generate", "--ckpt_path", "last", "--prompt", "café {", "--max_new_tokens", "5"])
    assert capsys.readouterr().out.startswith("café {")


def test_shared_characters_keep_the_checkpoints_rows_bitwise_and_new_ones_their_fresh_rows(pretrained):
    path = pretrained / "last.ckpt"
    ckpt = checkpoints.read(path)
    old, new = CharTokenizer(ckpt["CharDataModule"]["chars"]), CharTokenizer("".join(sorted("\n {}éKING:abc")))
    net = GPT(**ckpt["hyper_parameters"]["net"]["init_args"] | {"vocab_size": new.vocab_size, "block_size": 16})
    fresh = {name: tensor.clone() for name, tensor in net.state_dict().items()}
    assert resume.start_from(ckpt, path, net, new) == ["{", "}", "é"]
    weights = checkpoints.net_weights(ckpt)
    for i, c in enumerate(new.chars):
        row = weights["wte.weight"][old.stoi[c]] if c in old.stoi else fresh["wte.weight"][i]
        assert torch.equal(net.wte.weight[i], row), c
    assert net.lm_head.weight is net.wte.weight  # still tied: the output rows are the same rows
    assert torch.equal(net.wpe.weight, weights["wpe.weight"][:16])  # a shorter context: the first positions
    for name, tensor in net.state_dict().items():
        if name not in ("wte.weight", "lm_head.weight", "wpe.weight"):
            assert torch.equal(tensor, weights[name]), name


def test_a_bigram_keeps_the_entries_of_known_pairs_and_bytes_map_onto_themselves():
    table = torch.randn(3, 3)
    ckpt = {"state_dict": {"net.table.weight": table}, "CharDataModule": CharTokenizer("abc").state()}
    net = Bigram(3)
    fresh = net.table.weight.detach().clone()
    assert resume.start_from(ckpt, "abc.ckpt", net, CharTokenizer("bcd")) == ["d"]
    assert torch.equal(net.table.weight[:2, :2], table[1:, 1:])  # b and c, after and before each other
    assert torch.equal(net.table.weight[2], fresh[2]) and torch.equal(net.table.weight[:, 2], fresh[:, 2])
    table = torch.randn(256, 256)
    net = Bigram(256)
    ckpt = {"state_dict": {"net.table.weight": table}, "CharDataModule": ByteTokenizer().state()}
    assert resume.start_from(ckpt, "bytes.ckpt", net, ByteTokenizer()) == []
    assert torch.equal(net.table.weight, table)


def files_and_contents(folder) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != ".charlm-lock"}


PRETRAINED = "<pretrained>"  # the pretrained run's folder, filled in by the test


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model.init_from", "nothing.ckpt"], "--model.init_from nothing.ckpt does not exist: pass a .ckpt file"),
        (["--model.init_from", "notes.ckpt"], "notes.ckpt is not a valid checkpoint"),
        (
            ["--model.init_from", "bigram.ckpt", "--config", str(ROOT / "configs/gpt-cpu.yaml")],
            "--model.init_from bigram.ckpt holds a Bigram, the config or flags give --model.net GPT: drop it",
        ),
        (
            ["--model.init_from", PRETRAINED, "--config", str(ROOT / "configs/bigram.yaml")],
            "last.ckpt holds a GPT, the config or flags give --model.net Bigram: drop it",
        ),
        (
            ["--model.init_from", PRETRAINED, "--model.net.init_args.n_embd", "64"],
            "last.ckpt holds a GPT with n_embd=32, the config or flags give --model.net.init_args.n_embd 64: drop it",
        ),
        (
            ["--model.init_from", PRETRAINED, "--data.block_size", "64"],
            "--data.block_size 64 is longer than the 32 positions that --model.init_from",
        ),
        (
            ["--model.init_from", PRETRAINED, "--data.tokenizer", "bytes"],
            "last.ckpt was trained with --data.tokenizer chars, the config or flags give bytes: drop it",
        ),
        (
            ["--model.init_from", PRETRAINED, "--ckpt_path", PRETRAINED],
            "both given: --ckpt_path resumes the run it names, --model.init_from starts a new one",
        ),
        (
            ["--model.init_from", PRETRAINED, "--data.path", "digits.txt", "--generation.prompt", "1"],
            "none of the text's 9 characters is among the 65 that --model.init_from",
        ),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(pretrained, mine, corpus, tmp_path, flags, message):
    (tmp_path / "notes.ckpt").write_text(mine.read_text())
    (tmp_path / "digits.txt").write_text("0124567890" * 50)
    chars = "".join(sorted(set(corpus.read_text())))
    bigram = {
        "state_dict": {"net.table.weight": torch.zeros(65, 65)},
        "hyper_parameters": {"net": {"class_path": "charlm.models.Bigram", "init_args": {"vocab_size": 65}}},
        "CharDataModule": CharTokenizer(chars).state(),
    }
    torch.save(bigram, tmp_path / "bigram.ckpt")
    before = files_and_contents(pretrained.parents[2])
    flags = [str(pretrained) if flag == PRETRAINED else flag for flag in flags]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--data.path", str(mine), *flags])
    error = str(exit_info.value.code)
    assert error.startswith("charlm: error: ") and message in error and "\n" not in error
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "logs").exists()
    assert files_and_contents(pretrained.parents[2]) == before


def test_a_fine_tuning_run_resumed_after_ctrl_c_ends_as_an_uninterrupted_one(pretrained, mine, tmp_path, monkeypatch):
    flags = fine_tune(pretrained, mine, "--model.net.init_args.dropout", "0.1", "--generation.max_new_tokens", "0")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    for cwd in (straight, stopped):
        cwd.mkdir()
    monkeypatch.chdir(straight)
    main(flags)
    monkeypatch.chdir(stopped)
    with pytest.raises(SystemExit) as exit_info:
        main([*flags, "--trainer.callbacks+=probes.InterruptAt"])  # SIGINT after step 3
    assert exit_info.value.code == 130
    main([*flags, "--ckpt_path", "last"])  # the same flags: --model.init_from names the run's own starting point
    ckpts = "checkpoints/default-notes/version_0/last.ckpt"
    a, b = (torch.load(cwd / ckpts, weights_only=True) for cwd in (straight, stopped))
    assert a["global_step"] == b["global_step"] == 6
    assert all(torch.equal(a["state_dict"][name], b["state_dict"][name]) for name in a["state_dict"])  # bitwise
    assert b["hyper_parameters"]["init_from"] == str(pretrained / "last.ckpt")
