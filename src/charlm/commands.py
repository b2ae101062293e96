"""generate, attention and export: typed functions whose arguments are their flags and whose docstrings are their
--help.

torch and the checkpoint code are imported inside them, so that `--help` answers at once.
"""

import sys
from pathlib import Path
from typing import Literal

from jsonargparse.typing import PositiveInt

from charlm.settings import Device, Sampling, known_text

DEFAULT_PICTURE = "attention.png"


def load(ckpt_path: str, device: str, prompt_file: str | None):
    """The checkpoint's file, net and tokenizer, the device, and the prompt file's text (None without one)."""
    from charlm import checkpoints
    from charlm.files import read_text
    from charlm.settings import pick_device

    device = pick_device(device)
    path = checkpoints.resolve(ckpt_path, Path("checkpoints"))
    say_which(ckpt_path, path)
    net, tokenizer = checkpoints.load_net(path, device)
    return path, net, tokenizer, device, read_text(Path(prompt_file), "--prompt_file") if prompt_file else None


def say_which(ckpt_path: str, path: Path) -> None:
    """Where `last` or `best` had runs to choose from, which it took and why, in one line on stderr."""
    from charlm import checkpoints

    runs = len(checkpoints.runs_under(Path("checkpoints"))) if ckpt_path in ("last", "best") else 0
    if runs > 1:
        print(
            f"charlm: --ckpt_path {ckpt_path} is {path}, of the newest of the {runs} runs under checkpoints/: pass "
            "its folder to pick another",
            file=sys.stderr,
        )


def one_prompt(prompt: str, prompt_file: str | None) -> None:
    if prompt and prompt_file:
        raise ValueError("--prompt and --prompt_file both given: pass one of them")


def generate(
    ckpt_path: str,
    sampling: Sampling,
    prompt_file: str | None = None,
    num_samples: PositiveInt = 1,
    device: Device = "auto",
) -> None:
    """Stream text from a trained checkpoint to stdout (the checkpoint is all it needs).

    Args:
        ckpt_path: a .ckpt file; a folder (its last.ckpt, else the newest one a folder down); last: the newest run
            under checkpoints/; best: that run's lowest val/loss.
        sampling: the prompt and how the text is drawn (charlm.settings.Sampling).
        prompt_file: read the prompt from this UTF-8 file instead.
        num_samples: independent samples, one after another.
        device: where to run the model.
    """
    import torch

    from charlm import sampling as sample
    from charlm.settings import check

    if sys.stdout is None:  # started with stdout closed (generate >&-): Python has no stream to write the text to
        raise OSError("stdout is closed, and generate writes the text there: send it to a file or a pipe")
    check(sampling, "--")
    one_prompt(sampling.prompt, prompt_file)
    path, net, tokenizer, device, text = load(ckpt_path, device, prompt_file)
    sampling.prompt = sampling.prompt if text is None else text
    prompt = sampling.usable_prompt(tokenizer, "--")
    print(f"charlm: sampling from {path} on {device}", file=sys.stderr)
    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    idx = torch.tensor([tokenizer.encode(prompt)], device=device)
    for i in range(num_samples):
        if num_samples > 1:
            sys.stdout.write(f"===== sample {i + 1} of {num_samples} =====\n")
        sys.stdout.write(prompt)
        decoder = tokenizer.decoder()
        for next_id in sample.generate(net, idx, sampling, generator):
            sys.stdout.write(decoder.push(next_id.item()))
            sys.stdout.flush()  # stream: each character appears as soon as it is complete
        sys.stdout.write(decoder.flush() + "\n")


def attention(
    ckpt_path: str,
    prompt: str = "",
    prompt_file: str | None = None,
    out: str | None = None,
    device: Device = "auto",
    unknown: Literal["error", "skip"] = "error",
    heads: bool = False,
    lens: bool = False,
) -> None:
    """Save a picture of a GPT checkpoint's attention over a text: every layer and head, characters on both axes.

    Args:
        ckpt_path: a .ckpt file, a folder, last or best, as for generate.
        prompt: the text to look at.
        prompt_file: read the text from this UTF-8 file instead.
        out: the PNG file to write, whole, then renamed onto the name (default: attention.png, replaced only when
            it is a picture charlm drew).
        device: where to run the model.
        unknown: what to do with characters the model never saw.
        heads: print what each head does over the text instead (measured: the mean weight a character gives to
            the previous character, itself, the start of its word or line, or what followed an earlier occurrence
            of it; "spread out" when none takes 40%). A few thousand characters of validation text measure well.
        lens: print instead what the model would predict after the text's last character at each depth: after
            the embedding and after each block, through the final norm and the head (the logit lens).
    """
    from PIL.PngImagePlugin import PngInfo

    from charlm.attention import attention_picture
    from charlm.files import atomic_write
    from charlm.models import GPT

    tables = heads or lens  # what is printed instead of the picture
    if tables and not (prompt or prompt_file):
        raise ValueError("--heads and --lens look at a text: pass --prompt or --prompt_file")
    if out is None and not tables and not drawn_by_charlm(Path(DEFAULT_PICTURE)):
        raise FileExistsError(
            f"{DEFAULT_PICTURE} is there and is not a picture charlm drew: pass --out with a new name"
        )
    out = Path(out or DEFAULT_PICTURE)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out {out}: the picture is a PNG: give a file name ending in .png")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: the folder {out.parent} does not exist: create it, or write elsewhere")
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a folder: give a file name ending in .png")
    one_prompt(prompt, prompt_file)
    path, net, tokenizer, _, text = load(ckpt_path, device, prompt_file)
    prompt = known_text(tokenizer, prompt if text is None else text, "--prompt", "--unknown skip", unknown == "skip")
    if not isinstance(net, GPT):
        raise ValueError(f"--ckpt_path {path} holds a {type(net).__name__}, which has no attention: pass a GPT's")
    if tables:
        print_inside(net, tokenizer, tokenizer.encode(prompt), heads, lens)
        return
    image, note = attention_picture(net, tokenizer, tokenizer.encode(prompt))
    signature = PngInfo()
    signature.add_text("Software", "charlm")  # what lets a later run replace the default name
    with atomic_write(out) as f:
        image.save(f, format="PNG", optimize=True, pnginfo=signature)
    n_layer, n_head = net.config["n_layer"], net.config["n_head"]
    print(f"charlm: wrote {out}: {n_layer} x {n_head} panels (layers x heads)", file=sys.stderr)
    if note:
        print(f"charlm: the text is longer than a picture fits: {note}", file=sys.stderr)


def print_inside(net, tokenizer, ids: list[int], heads: bool, lens: bool) -> None:
    """The head roles and the lens as tables on stdout."""
    from rich.console import Console
    from rich.table import Table

    from charlm import inside
    from charlm.tokenizers import visible

    console = Console(soft_wrap=True, highlight=False)
    if heads:
        short = [role.split()[-1] if role.startswith("start") else role.split()[0] for role in inside.ROLES]
        table = Table("layer", "head", "does", "score", *short, title=f"each head over {len(ids):,} characters")
        for layer, row in enumerate(inside.roles(net, tokenizer, ids)):
            for head, (role, score, scores) in enumerate(row):
                table.add_row(
                    str(layer + 1), str(head + 1), role, f"{score:.2f}", *(f"{v:.2f}" for v in scores.values())
                )
        console.print(table)
    if lens:
        probs = inside.lens(net, ids[-net.block_size :])
        table = Table("after", "the five most likely next characters", title="the lens: each depth's prediction")
        for depth, row in enumerate(probs):
            top = row.topk(5)
            cells = "  ".join(f"{visible(tokenizer.decode([i]))} {p:.1%}" for p, i in zip(*(t.tolist() for t in top)))
            table.add_row("the embedding" if depth == 0 else f"block {depth}", cells)
        console.print(table)


def drawn_by_charlm(path: Path) -> bool:
    """Whether a file may be replaced by a new picture: absent, or a PNG that charlm drew (not a link to one)."""
    if not (path.exists() or path.is_symlink()):
        return True
    if path.is_symlink() or not path.is_file():
        return False
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.format == "PNG" and image.text.get("Software") == "charlm"
    except OSError:  # not an image at all
        return False


def export(to: str, ckpt_path: str = "last", web: bool = False, overwrite: bool = False) -> None:
    """Write a checkpoint's net as a folder that loads without charlm's checkpoints: model.safetensors (the weights),
    config.json (the net and its vocabulary) and README.md (a model card); no pickle anywhere.

    Args:
        to: the folder to write, whole or not at all. charlm.load(folder) loads it, and --ckpt_path and
            --model.init_from take it wherever they take a checkpoint.
        ckpt_path: a .ckpt file, a folder, last or best, as for generate.
        web: also write the playground page (index.html, static/), which runs the model in the browser with no
            server: serve the folder from any static host (python -m http.server, GitHub Pages).
        overwrite: replace the export already in the folder (a folder of other files is never replaced).
    """
    from charlm import checkpoints, exported
    from charlm.settings import describe

    path = checkpoints.resolve(ckpt_path, Path("checkpoints"))
    say_which(ckpt_path, path)
    ckpt = checkpoints.read(path)
    cls, init_args, tokenizer = checkpoints.checked_net(ckpt, path)
    checkpoints.check_finite(ckpt, path)
    facts = checkpoints.described(ckpt, cls, init_args, tokenizer)
    trained = {"steps": facts["step"] or 0, "val_loss": facts["val_loss"], "parameters": facts["parameters"]}
    trained |= {"text": ckpt[checkpoints.DATA].get("source"), "commands": ckpt.get("commands", [])}
    config = {"charlm_export": exported.FORMAT, "net": cls.__name__, "init_args": init_args}
    config |= {"tokenizer": tokenizer.state(), "trained": trained}
    to = Path(to)
    card = exported.card(config, to.name)
    page = describe(Sampling) if web else None
    exported.write(to, exported.files(config, checkpoints.net_weights(ckpt), card, page), overwrite)
    size = sum(f.stat().st_size for f in to.rglob("*") if f.is_file())
    print(f"charlm: exported {path} to {to}/ ({size:,} bytes): python -m charlm generate --ckpt_path {to}")
    if web:
        print(f"charlm: the page: python -m http.server --directory {to}, then open http://127.0.0.1:8000")
