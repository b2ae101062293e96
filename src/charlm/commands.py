"""generate and attention: typed functions whose arguments are their flags and whose docstrings are their --help.

torch and the checkpoint code are imported inside them, so that `--help` answers at once.
"""

import sys
from pathlib import Path
from typing import Literal

from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveInt, restricted_number_type

Probability = restricted_number_type("Probability", float, [(">", 0), ("<=", 1)])
SEEDS = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
Seed = restricted_number_type("Seed", int, [(">=", SEEDS[0]), ("<=", SEEDS[1])])
Device = Literal["auto", "cpu", "cuda", "mps"]
DEFAULT_PICTURE = "attention.png"


def load(ckpt_path: str, prompt: str, prompt_file: str | None, device: str, unknown: str):
    """The checkpoint's file, net and tokenizer, the device and the prompt that generate and attention are given."""
    from charlm import checkpoints
    from charlm.data import read_text

    if prompt and prompt_file:
        raise ValueError("--prompt and --prompt_file both given: pass one of them")
    device = pick_device(device)
    path = checkpoints.resolve(ckpt_path, Path("checkpoints"))
    net, tokenizer = checkpoints.load_net(path, device)
    prompt = read_text(Path(prompt_file), "--prompt_file") if prompt_file else prompt
    return path, net, tokenizer, device, usable_prompt(tokenizer, prompt, unknown, "pass --unknown skip")


def pick_device(device: str) -> str:
    """The device a model runs on: auto is a CUDA GPU, then Apple's MPS, then the CPU."""
    import torch

    here = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if device == "auto":
        return next(name for name, available in here.items() if available)
    if not here[device]:
        what = "CUDA GPU" if device == "cuda" else "Apple MPS device"
        raise ValueError(f"--device {device}: no {what} is available here: use --device cpu or auto")
    return device


def usable_prompt(tokenizer, prompt: str, unknown: str, skip: str) -> str:
    """The prompt as the model reads it: without the characters the model never saw when `unknown` is skip (else
    they are an error that says `skip` is the way round it), and `empty_prompt` when nothing is left."""
    from charlm.tokenizers import empty_prompt

    missing = tokenizer.unknown(prompt)
    if missing and unknown == "error":
        raise ValueError(
            f"the prompt has characters {missing!r} that are not among the model's {tokenizer.vocab_size}: "
            f"change the prompt, or {skip} to drop them"
        )
    return "".join(c for c in prompt if c not in set(missing)) or empty_prompt(tokenizer)


def generate(
    ckpt_path: str,
    prompt: str = "",
    prompt_file: str | None = None,
    max_new_tokens: NonNegativeInt = 500,
    temperature: NonNegativeFloat = 0.8,
    top_k: PositiveInt | None = None,
    top_p: Probability | None = None,
    num_samples: PositiveInt = 1,
    seed: Seed = 1337,
    device: Device = "auto",
    unknown: Literal["error", "skip"] = "error",
) -> None:
    """Stream text from a trained checkpoint to stdout (the checkpoint is all it needs).

    Args:
        ckpt_path: a .ckpt file; a folder (its last.ckpt, else the newest one a folder down); last: the newest run
            under checkpoints/; best: that run's lowest val/loss.
        prompt: the text to continue (empty: a newline).
        prompt_file: read the prompt from this UTF-8 file instead.
        max_new_tokens: characters to generate.
        temperature: 0 is greedy (argmax).
        top_k: sample among the k most likely characters.
        top_p: nucleus: sample among the smallest set of characters whose probability reaches p.
        num_samples: independent samples, one after another.
        seed: the same seed, checkpoint, arguments and device give the same text.
        device: where to run the model.
        unknown: what to do with prompt characters the model never saw.
    """
    import torch

    from charlm import sampling

    if sys.stdout is None:  # started with stdout closed (generate >&-): Python has no stream to write the text to
        raise OSError("stdout is closed, and generate writes the text there: send it to a file or a pipe")
    path, net, tokenizer, device, prompt = load(ckpt_path, prompt, prompt_file, device, unknown)
    print(f"charlm: sampling from {path} on {device}", file=sys.stderr)
    generator = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([tokenizer.encode(prompt)], device=device)
    for i in range(num_samples):
        if num_samples > 1:
            sys.stdout.write(f"===== sample {i + 1} of {num_samples} =====\n")
        sys.stdout.write(prompt)
        decoder = tokenizer.decoder()
        for next_id in sampling.generate(net, idx, max_new_tokens, temperature, top_k, top_p, generator):
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
    """
    from PIL.PngImagePlugin import PngInfo

    from charlm.attention import attention_picture
    from charlm.files import atomic_write
    from charlm.models import GPT

    if out is None and not drawn_by_charlm(Path(DEFAULT_PICTURE)):
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
    path, net, tokenizer, _, prompt = load(ckpt_path, prompt, prompt_file, device, unknown)
    if not isinstance(net, GPT):
        raise ValueError(f"--ckpt_path {path} holds a {type(net).__name__}, which has no attention: pass a GPT's")
    image, note = attention_picture(net, tokenizer, tokenizer.encode(prompt))
    signature = PngInfo()
    signature.add_text("Software", "charlm")  # what lets a later run replace the default name
    with atomic_write(out) as f:
        image.save(f, format="PNG", optimize=True, pnginfo=signature)
    n_layer, n_head = net.config["n_layer"], net.config["n_head"]
    print(f"charlm: wrote {out}: {n_layer} x {n_head} panels (layers x heads)", file=sys.stderr)
    if note:
        print(f"charlm: the text is longer than a picture fits: {note}", file=sys.stderr)


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
