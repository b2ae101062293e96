"""The exported folder's format: what `charlm export` writes and `charlm.load` reads, for others to load without
charlm's checkpoints (no pickle anywhere), in the layout the Hugging Face Hub takes as a model repository:

- `config.json`: the net (`net`, one of charlm's classes, and `init_args`, its constructor's arguments), the
  tokenizer with its vocabulary, and what the run was (`trained`: steps, val loss, text, commands);
- `model.safetensors`: the net's weights, each under its name in the net's state_dict;
- `README.md`: the model card, written from the same facts;
- with `--web`, `index.html` and `static/`: the playground page, the model running in the browser tab (model.js).

The folder is written whole or not at all (`write`); a folder read back is untrusted, and `checkpoints` checks what
it holds as it checks a checkpoint.
"""

import json
import math
import os
import re
import shlex
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from charlm.errors import first_line
from charlm.files import TEMP_PREFIX, file_kind

CONFIG, WEIGHTS, CARD = "config.json", "model.safetensors", "README.md"
NAMES = {CONFIG, WEIGHTS, CARD, "index.html", "static"}  # all an export's folder may hold (the page: the last two)
PLAYGROUND = Path(__file__).parent / "playground"
FORMAT = 1  # config.json's "charlm_export": a reader refuses a format it does not know
MAX_CONFIG_BYTES = 2**22  # a vocabulary of 65,536 characters is far less


def is_export(folder: Path) -> bool:
    """Whether a folder is meant as an export (it has a config.json): then it is read as one, or refused as one."""
    return file_kind(folder) == "a folder" and file_kind(folder / CONFIG) != "missing"


def read(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and the weights, once both are known to be files of the right kinds; the values in them are
    the caller's to check. Never unpickles: JSON and safetensors only."""
    for name in (CONFIG, WEIGHTS):
        kind = file_kind(folder / name)
        if kind != "a regular file":
            raise ValueError(f"its {name} is {kind}")
    size = (folder / CONFIG).stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"its {CONFIG} holds {size:,} bytes, more than the {MAX_CONFIG_BYTES:,} of any export")
    try:
        config = json.loads((folder / CONFIG).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"its {CONFIG} is not JSON ({first_line(e, limit=80)})") from None
    if not isinstance(config, dict) or config.get("charlm_export") != FORMAT:
        raise ValueError(f'its {CONFIG} has no "charlm_export": {FORMAT}')
    try:
        weights = load_file(folder / WEIGHTS)
    except Exception as e:  # whatever its bytes make the reader raise, they are no weights
        raise ValueError(f"its {WEIGHTS} cannot be read ({first_line(e, limit=80)})") from None
    return config, weights


def files(config: dict, weights: dict[str, torch.Tensor], card: str, page: dict | None) -> dict[str, bytes]:
    """The folder's files by name; with `page` (the generation settings' defaults and bounds), the playground page
    too, running the model in the browser tab with no server (index.html, static/)."""
    # safetensors keeps one copy of a shared tensor; each name gets its own, so any reader finds every weight; and
    # float32 whatever the checkpoint's, as the page reads it
    tensors = {name: t.detach().to("cpu", torch.float32, copy=True).contiguous() for name, t in weights.items()}
    out = {
        WEIGHTS: save(tensors),
        CONFIG: (json.dumps(config, indent=1, ensure_ascii=False) + "\n").encode(),
        CARD: card.encode(),
    }
    if page is not None:
        html = (PLAYGROUND / "index.html").read_text(encoding="utf-8")
        script = '<script src="static/playground.js"></script>'
        out["index.html"] = html.replace(script, '<script src="static/model.js"></script>\n  ' + script).encode()
        for name in ("playground.js", "playground.css", "model.js"):
            out[f"static/{name}"] = (PLAYGROUND / name).read_bytes()
        out["static/settings.json"] = json.dumps(page).encode()
    return out


def write(to: Path, contents: dict[str, bytes], overwrite: bool) -> None:
    """Write the folder beside `to` under a temporary name, then rename it into place: `to` is either what it was
    or the whole new export. An existing `to` is replaced only if it is empty, or with `overwrite` if it holds
    nothing but an export's files (never a folder of other things, such as the run's own checkpoints)."""
    kind = file_kind(to)
    if kind not in ("missing", "a folder"):
        raise ValueError(f"--to {to} is {kind}: pass a folder to write the export into")
    inside = sorted(p.name for p in to.iterdir()) if kind == "a folder" else []
    others = [name for name in inside if name not in NAMES]
    if others:
        raise ValueError(f"--to {to} holds files that are no export's ({', '.join(others[:3])}): pick another folder")
    if inside and not overwrite:
        raise ValueError(f"--to {to} holds an export already: pass --overwrite to replace it, or another folder")
    to.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = (to.parent / f"{TEMP_PREFIX}{os.getpid()}-{to.name}{suffix}" for suffix in ("", ".old"))
    try:
        tmp.mkdir()
        for name, data in contents.items():
            (tmp / name).parent.mkdir(exist_ok=True)
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        if inside:
            os.rename(to, old)
        elif kind == "a folder":
            to.rmdir()
        os.rename(tmp, to)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if inside and not to.exists() and old.exists():
            os.rename(old, to)  # the export that was there stays
        raise OSError(f"exporting into {to} failed ({e.strerror or e}): nothing was written") from None
    shutil.rmtree(old, ignore_errors=True)


def code(text: str) -> str:
    """Markdown code that shows any text on one line: fenced by more backticks than the text has in a row."""
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}"


def card(config: dict, folder_name: str) -> str:
    """The model card: what the model is, what it was trained on and how, and how to load it."""
    net, trained, tokenizer = config["net"], config["trained"], config["tokenizer"]
    unit = "byte" if tokenizer["tokenizer"] == "bytes" else "character"
    loss = trained.get("val_loss")
    text = trained.get("text")
    lines = [
        "---",
        "library_name: charlm",
        "tags: [charlm, character-level, text-generation]",
        "---",
        f"# A character-level {net} trained with charlm",
        "",
        f"- **Parameters**: {trained['parameters']:,}",
        f"- **Architecture**: {net}, "
        + ", ".join(f"{key} {code(str(value))}" for key, value in config["init_args"].items()),
        f"- **Tokenizer**: {tokenizer['tokenizer']}, {config['init_args']['vocab_size']} ids",
        f"- **Steps trained**: {trained['steps']:,}",
        "- **Validation loss**: "
        + (f"{loss:.4f} nats, {loss / math.log(2):.4f} bits per {unit}" if loss is not None else "not recorded"),
    ]
    if text:
        lines.append(f"- **Trained on**: {code(text['name'])}, {text['bytes']:,} bytes, sha256 {code(text['sha256'])}")
    else:
        lines.append("- **Trained on**: not recorded (a checkpoint from before charlm recorded its text)")
    commands = trained.get("commands") or []
    if commands:
        lines += ["", "## How it was trained", ""]
        lines += [f"{i}. {code(command)}" for i, command in enumerate(commands, 1)]
    lines += [
        "",
        "## How to load it",
        "",
        "```python",
        "import charlm",
        "",
        f"net, tokenizer = charlm.load({json.dumps(folder_name)})  # safetensors and JSON: no pickle",
        "```",
        "",
        "```bash",
        f"python -m charlm generate --ckpt_path {shlex.quote(folder_name)} --prompt 'A' --max_new_tokens 200",
        f"python -m charlm serve --ckpt_path {shlex.quote(folder_name)}   # the playground",
        "```",
        "",
        f"`{WEIGHTS}` holds the weights by their names in the net's `state_dict`; `{CONFIG}` the net's class and "
        "constructor arguments, and the tokenizer's vocabulary.",
        "",
    ]
    return "\n".join(lines)
