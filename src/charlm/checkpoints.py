"""charlm's checkpoint format: what a checkpoint holds, which file --ckpt_path names, how it is read and checked
(`saving` writes them).

A checkpoint is Lightning's dict (weights under `state_dict`, optimizer, loops, callback states) plus:
- `hyper_parameters["net"]`: the net as `{"class_path", "init_args"}`, plain values, so it loads with weights_only;
- `CharDataModule`: the tokenizer (the DataModule's state_dict), so a checkpoint alone can generate text, and the
  training batches' block_size, batch_size and seed, so a run resumed with others can say so;
- `rng_states`: the torch and CUDA generators, so dropout after a resume draws what the run would have drawn;
- `log_version`: the TensorBoard version folder the run logged into, where a resumed run logs on;
- `hyper_parameters["init_from"]`: for a fine-tuned run, the checkpoint file its weights started from;
- `CharDataModule["source"]`: the text trained on (file name, bytes, sha256), and `commands`: the command lines of
  the run, the first and each resume, for the model card an export writes.

A folder that `charlm export` wrote (`exported`) reads as a checkpoint of that layout and is checked as one.

Whatever starts from a checkpoint (resume, validate, test, fine-tune, generate) builds the net it describes
(`checked_net`); what a run that starts from one takes from it, and holds against it, is `resume`'s.

A run's checkpoints go to `checkpoints/<name>/version_N/`, beside its logs (`runs.place_run`).
`--ckpt_path` means one thing in every command (`resolve`): a file is that file; a folder is its `last.ckpt`, or
else the newest `last.ckpt` one or two folders down; `last` is the checkpoint folder taken that way
(`checkpoints/<name>/` or `--checkpoint.dirpath` for fit, validate and test: the newest run of that name;
`checkpoints/` for generate, attention and `--model.init_from`: the newest run); `best` is the checkpoint with the
lowest val/loss that the `last.ckpt` so found names, in that file's folder.
"""

import inspect
import re
from pathlib import Path

import torch

from charlm import exported
from charlm.errors import first_line
from charlm.files import file_kind
from charlm.models import GPT, Bigram, Net
from charlm.tokenizers import Tokenizer, tokenizer_from_state

LAST = "last.ckpt"
DATA = "CharDataModule"  # where Lightning keeps the DataModule's state_dict: its class name
NETS = {f"{cls.__module__}.{cls.__name__}": cls for cls in (GPT, Bigram)}  # the only classes a checkpoint may name


def resolve(ckpt_path: str, folder: Path, flag: str = "--ckpt_path") -> Path:
    """The checkpoint file that `flag` (--ckpt_path, --model.init_from) names; `folder` is the one that `last` and
    `best` look in."""
    if ckpt_path not in ("last", "best"):
        folder = Path(ckpt_path)
        kind = file_kind(folder)
        if kind == "a regular file" or exported.is_export(folder):
            return folder
        if kind == "missing":
            raise FileNotFoundError(f"{flag} {ckpt_path} does not exist: pass a .ckpt file, a folder, last or best")
        if kind != "a folder":
            raise ValueError(f"{flag} {ckpt_path} is {kind}, not a checkpoint: pass a .ckpt file, a folder, last, best")
    last = folder / LAST
    kind = file_kind(last)
    if kind not in ("a regular file", "missing"):
        raise ValueError(f"{flag} {ckpt_path}: {last} is {kind}, not a checkpoint: remove it, or pass a file")
    if kind == "missing":
        below = sorted(runs_under(folder), key=lambda p: p.stat().st_mtime)
        if not below:
            raise FileNotFoundError(
                f"{flag} {ckpt_path}: no {LAST} in {folder.resolve()}/: train first, or pass a file"
            )
        last = below[-1]
    return best(last, flag) if ckpt_path == "best" else last


def runs_under(folder: Path) -> list[Path]:
    """Each run's last.ckpt one or two folders down, by path: checkpoints/<name>/version_N/last.ckpt (a run's folder
    holds its versions, checkpoints/ its runs). A FIFO or device of that name is no checkpoint (opening a FIFO would
    wait for a writer)."""
    found = [*folder.glob(f"*/{LAST}"), *folder.glob(f"*/*/{LAST}")]
    return sorted(path for path in found if file_kind(path) == "a regular file")


def best(last: Path, flag: str) -> Path:
    """The checkpoint with the lowest val/loss that a last.ckpt names, in the last.ckpt's folder (moved or not)."""
    states = read(last).get("callbacks", {})
    names = [Path(state["best_model_path"]).name for state in states.values() if state.get("best_model_path")]
    if not names or not (last.parent / names[0]).is_file():
        raise FileNotFoundError(f"{flag} best: {last} names no best checkpoint that exists: pass a file")
    return last.parent / names[0]


def read(path: Path, device: torch.device | str = "cpu") -> dict:
    """A charlm checkpoint, with one-line errors; weights_only, so a pickle that would run code is refused.

    Everything charlm reads from it without a model at hand is checked here (`check_layout`), before anything uses it.
    An exported folder is read without unpickling anything (`from_export`).
    """
    if exported.is_export(path):
        return from_export(path, device)
    kind = file_kind(path)
    if kind not in ("a regular file", "missing"):  # checked before opening: opening a FIFO waits for a writer
        raise ValueError(f"{path} is {kind}, not a checkpoint: pass a .ckpt file charlm saved")
    with open(path, "rb") as f:  # an error here is the file's (unreadable, missing), after it the bytes'
        try:
            ckpt = torch.load(f, map_location=device, weights_only=True)
        except Exception as e:  # whatever its bytes make the unpickler raise, they are no checkpoint
            reason = first_line(e)
            raise ValueError(f"{path} is not a valid checkpoint ({reason}): pass a .ckpt file charlm saved") from None
    try:
        check_layout(ckpt)
    except ValueError as e:
        raise not_ours(path, e) from None
    return ckpt


def from_export(folder: Path, device: torch.device | str) -> dict:
    """An exported folder as a checkpoint of charlm's layout, checked as one (`check_layout`)."""
    try:
        config, weights = exported.read(folder)
        name = expect(config.get("net"), str, "net")
        trained = expect(config.get("trained", {}), dict, "trained")
        val_loss = expect(trained.get("val_loss"), float | None, "val_loss")
        ckpt = {
            "state_dict": {f"net.{key}": tensor.to(device) for key, tensor in weights.items()},
            "hyper_parameters": {"net": {"class_path": f"charlm.models.{name}", "init_args": config.get("init_args")}},
            DATA: expect(config.get("tokenizer"), dict, "tokenizer") | {"source": trained.get("text")},
            "global_step": trained.get("steps", 0),
            "commands": trained.get("commands", []),
            # where a checkpoint's ModelCheckpoint keeps the val loss at its save
            "callbacks": {} if val_loss is None else {"export": {"current_score": torch.tensor(val_loss)}},
        }
        check_layout(ckpt)
    except ValueError as e:
        raise not_ours(folder, e) from None
    return ckpt


def not_ours(path: Path, reason: Exception) -> ValueError:
    """The one-line refusal of a checkpoint file or an exported folder that holds what charlm never wrote."""
    if exported.is_export(path):
        return ValueError(f"{path} is not a charlm export ({reason}): pass a folder charlm export wrote")
    return ValueError(f"{path} is not a charlm checkpoint ({reason}): pass a .ckpt file charlm saved")


def expect(value, kind, what: str):
    """`value` if it is a `kind` (a bool counts as no int), else a ValueError that names `what`."""
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float)):
        raise ValueError(f"its {what} is {type(value).__name__} {str(value)[:40]!r}")
    return value


def check_layout(ckpt) -> None:
    """Refuse, naming the first bad value, a checkpoint whose net, tokenizer, step, log folder or callback states are
    not of the kinds charlm writes (a checkpoint is untrusted input: it may be tampered with or not charlm's)."""
    expect(ckpt, dict, "content")
    check_dense(ckpt)
    for name, tensor in expect(ckpt.get("state_dict"), dict, "state_dict").items():
        expect(tensor, torch.Tensor, f"weight {str(name)[:40]!r}")
        if not tensor.is_floating_point() or tensor.is_meta:
            raise ValueError(f"its weight {str(name)[:40]!r} is {tensor.dtype} on {tensor.device}, not real numbers")
    hparams = expect(ckpt.get("hyper_parameters"), dict, "hyper_parameters")
    expect(hparams.get("init_from"), str | None, "init_from")
    net = expect(hparams.get("net"), dict, "net")
    if net.get("class_path") not in NETS:
        raise ValueError(f"its net {str(net.get('class_path'))[:40]!r} is not one of {list(NETS)}")
    for name, value in expect(net.get("init_args"), dict, "net's init_args").items():
        expect(value, int | float | str | None, f"init_args {str(name)[:40]!r}")
    tokenizer_from_state(ckpt.get(DATA))
    source = ckpt[DATA].get("source")
    if source is not None:
        expect(source, dict, "text")
        if len(expect(source.get("name"), str, "text's name")) > 255:
            raise ValueError(f"its text's name {source['name'][:40]!r}... is longer than a file name")
        expect(source.get("bytes"), int, "text's size")
        if not re.fullmatch("[0-9a-f]{64}", expect(source.get("sha256"), str, "text's sha256")):
            raise ValueError(f"its text's sha256 {source['sha256'][:70]!r} is no sha256")
    for command in expect(ckpt.get("commands", []), list, "commands"):
        expect(command, str, "command")
    if expect(ckpt.get("global_step", 0), int, "global_step") < 0:
        raise ValueError(f"its global_step {ckpt['global_step']} is negative")
    if ckpt.get("log_version") is not None and expect(ckpt["log_version"], int, "log_version") < 0:
        raise ValueError(f"its log_version {ckpt['log_version']} is negative")
    for name, state in expect(ckpt.get("callbacks", {}), dict, "callbacks").items():
        expect(state, dict, f"callback state {str(name)[:40]!r}")
        for key in ("best_model_path", "last_model_path", "kth_best_model_path", "dirpath"):
            expect(state.get(key, ""), str, key)
        for key in ("best_model_score", "current_score", "kth_value"):
            expect(state.get(key), torch.Tensor | None, key)
        for saved, score in expect(state.get("best_k_models", {}), dict, "best_k_models").items():
            expect(saved, str, "best_k_models path")
            expect(score, torch.Tensor, "best_k_models score")


def check_dense(ckpt: dict) -> None:
    """charlm saves dense tensors only; a sparse one would fail far from here, in whatever copies it (a weight, a
    moment, a generator state). A loop, not recursion: a checkpoint may nest deeper than Python's stack."""
    stack = [(str(key)[:40], value) for key, value in ckpt.items()]
    while stack:
        what, value = stack.pop()
        if isinstance(value, torch.Tensor) and value.layout != torch.strided:
            raise ValueError(f"its {what} is a {value.layout} tensor, not a dense one")
        if isinstance(value, dict):
            stack.extend((f"{what}.{str(key)[:40]}"[:160], inner) for key, inner in value.items())
        elif isinstance(value, list | tuple):
            stack.extend((f"{what}[{i}]"[:160], inner) for i, inner in enumerate(value))


def differing(saved: dict, expected: dict) -> str | None:
    """The first weight whose name or shape differs between two state dicts, said in words, or None."""
    for name in sorted(expected.keys() | saved.keys()):
        if name not in saved or name not in expected or saved[name].shape != expected[name].shape:
            there = list(saved[name].shape) if name in saved else "absent"
            here = list(expected[name].shape) if name in expected else "absent"
            return f"{name} is {there} in the checkpoint and {here} in"
    return None


# what a GPT saved before an option existed was built with, where the option's default is now another
SAVED_BEFORE = {"pos_emb": "learned", "qk_norm": False}


def checked_net(ckpt: dict, path: Path) -> tuple[type[Net], dict, Tokenizer]:
    """The class, init_args and tokenizer of a checkpoint's net, once they are known to describe its weights: each
    size at most the number of weights, no more layers than tensors, the net built without memory (on the meta
    device) and its weight names and shapes compared, its other buffers no larger than its weights."""
    net_config = ckpt["hyper_parameters"]["net"]
    cls = NETS[net_config["class_path"]]
    init_args = net_config["init_args"]
    defaults = inspect.signature(cls).parameters
    for name, value in init_args.items():  # of the kind of its default: a number where a number belongs
        kind = type(defaults[name].default) if name in defaults else None
        if kind in (int, bool, float) and not (type(value) is kind or kind is float and type(value) is int):
            raise not_ours(path, f"its init_args {name!r} is {type(value).__name__} {str(value)[:40]!r}")
    if cls is GPT:
        init_args = SAVED_BEFORE | init_args
    weights = net_weights(ckpt)
    numel = sum(t.numel() for t in weights.values())
    sizes = {k: v for k, v in init_args.items() if isinstance(v, int) and v > numel}
    if isinstance(init_args.get("n_layer"), int) and init_args["n_layer"] > len(weights):
        sizes["n_layer"] = init_args["n_layer"]
    try:
        if sizes:
            raise ValueError(f"{sizes} exceeds the {numel:,} weights it holds")
        with torch.device("meta"):
            shell = cls(**init_args)
        difference = differing(weights, shell.state_dict())
        if difference:
            raise ValueError(f"its weights do not match its init_args: {difference} its init_args")
        if sum(b.numel() for b in shell.buffers()) > numel:
            raise ValueError(f"its init_args {init_args} build buffers larger than its weights")
        tokenizer = tokenizer_from_state(ckpt[DATA])
        if tokenizer.vocab_size != shell.config["vocab_size"]:
            raise ValueError(f"its tokenizer has {tokenizer.vocab_size} ids, its net {shell.config['vocab_size']}")
    except (TypeError, ValueError) as e:
        raise not_ours(path, e) from None
    return cls, shell.config, tokenizer


def net_weights(ckpt: dict) -> dict[str, torch.Tensor]:
    return {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}


def check_finite(ckpt: dict, path: Path) -> None:
    """Refuse weights that hold NaN or infinity: nothing to sample or start from (resume and validate find it out
    in their first loss, and say so then)."""
    diverged = [name for name, tensor in net_weights(ckpt).items() if not tensor.isfinite().all()]
    if diverged:
        raise ValueError(
            f"{path}: its weight {diverged[0]} holds NaN or infinity (the run diverged): pass an earlier one"
        )


def load_net(path: Path | str, device: torch.device | str = "cpu") -> tuple[Net, Tokenizer]:
    """The net (in eval mode) and the tokenizer stored in a charlm checkpoint or an exported folder (`checked_net`);
    nothing else is needed. `charlm.load` is this."""
    path = Path(path)
    ckpt = read(path, device)
    cls, init_args, tokenizer = checked_net(ckpt, path)
    check_finite(ckpt, path)
    net = cls(**init_args)
    net.load_state_dict(net_weights(ckpt))
    return net.to(device).eval(), tokenizer


def facts(path: Path) -> dict:
    """What a listing of runs says of a checkpoint: its net, step, val loss, tokenizer and size, or its error."""
    try:
        ckpt = read(path)
        cls, config, tokenizer = checked_net(ckpt, path)
    except (OSError, ValueError) as e:
        return {"error": str(e)}
    return described(ckpt, cls, config, tokenizer)


def described(ckpt: dict, cls: type[Net], config: dict, tokenizer: Tokenizer) -> dict:
    """`facts` of a checkpoint already read and checked."""
    with torch.device("meta"):  # its parameters, a tied one counted once, without memory
        parameters = sum(p.numel() for p in cls(**config).parameters())
    return {
        "net": cls.__name__,
        "attention": cls is GPT,
        "step": ckpt.get("global_step") if type(ckpt.get("global_step")) is int else None,
        "val_loss": val_loss(ckpt),
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "block_size": config.get("block_size"),  # a bigram reads one character
        "parameters": parameters,
    }


def val_loss(ckpt: dict) -> float | None:
    """The val loss at the checkpoint's save, as its ModelCheckpoint kept it (checked: a value from a file)."""
    for state in ckpt.get("callbacks", {}).values():
        score = state.get("current_score") if isinstance(state, dict) else None
        if isinstance(score, torch.Tensor) and score.numel() == 1 and score.isfinite().all():
            return round(score.item(), 4)
    return None
