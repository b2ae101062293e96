"""charlm's checkpoint format: what a checkpoint holds, which file --ckpt_path names, how it is read and checked
(`saving` writes them).

A checkpoint is Lightning's dict (weights under `state_dict`, optimizer, loops, callback states) plus:
- `hyper_parameters["net"]`: the net as `{"class_path", "init_args"}`, plain values, so it loads with weights_only;
- `CharDataModule`: the tokenizer (the DataModule's state_dict), so a checkpoint alone can generate text, and the
  training batches' block_size, batch_size and seed, so a run resumed with others can say so;
- `rng_states`: the torch and CUDA generators, so dropout after a resume draws what the run would have drawn;
- `log_version`: the TensorBoard version folder the run logged into, where a resumed run logs on;
- `hyper_parameters["init_from"]`: for a fine-tuned run, the checkpoint file its weights started from.

Whatever starts from a checkpoint (resume, validate, test, fine-tune, generate) builds the net it describes
(`checked_net`); `adopt_architecture` refuses a config or flag that says otherwise, and `start_from` carries a
checkpoint's weights over to a net for another text, character by character.

A run's checkpoints go to `checkpoints/<name>/version_N/`, beside its logs (`runs.place_run`).
`--ckpt_path` means one thing in every command (`resolve`): a file is that file; a folder is its `last.ckpt`, or
else the newest `last.ckpt` one or two folders down; `last` is the checkpoint folder taken that way
(`checkpoints/<name>/` or `--checkpoint.dirpath` for fit, validate and test: the newest run of that name;
`checkpoints/` for generate, attention and `--model.init_from`: the newest run); `best` is the checkpoint with the
lowest val/loss that the `last.ckpt` so found names, in that file's folder.
"""

from pathlib import Path

import lightning as L
import torch
from jsonargparse import Namespace
from rich.console import Console

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
        if kind == "a regular file":
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
        # checkpoints/<name>/version_N/last.ckpt: a run's folder holds its versions, checkpoints/ its runs; a FIFO
        # or device of that name is no checkpoint (opening a FIFO would wait for a writer)
        found = [*folder.glob(f"*/{LAST}"), *folder.glob(f"*/*/{LAST}")]
        below = sorted([p for p in found if file_kind(p) == "a regular file"], key=lambda p: p.stat().st_mtime)
        if not below:
            raise FileNotFoundError(
                f"{flag} {ckpt_path}: no {LAST} in {folder.resolve()}/: train first, or pass a file"
            )
        last = below[-1]
    return best(last, flag) if ckpt_path == "best" else last


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
    """
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
        raise ValueError(f"{path} is not a charlm checkpoint ({e}): pass a .ckpt file charlm saved") from None
    return ckpt


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


def same_layout(value, template, what: str) -> None:
    """Refuse `value` unless it has every key of `template` and the same kinds of values, all the way down (None in
    the template: any value; a list: each element like the template's first)."""
    if template is None:
        return
    expect(value, type(template), what or "content")
    if isinstance(template, dict):
        for key, inner in template.items():
            if key not in value:
                raise ValueError(f"its {what or 'content'} has no {key!r}")
            same_layout(value[key], inner, f"{what}.{key}" if what else key)
    elif isinstance(template, (list, tuple)) and template:
        for i, item in enumerate(value):
            same_layout(item, template[0], f"{what}[{i}]")


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


def check_fits(ckpt: dict, path: Path, fn: str, trainer: L.Trainer, model, datamodule: L.LightningDataModule) -> None:
    """Fail before any work if a checkpoint does not fit the configured run: its vocabulary, its weight shapes, and
    what Lightning's `fn` (fit, validate or test) restores from it: loops, callback states, and to resume training
    the optimizer, the schedule and the generators."""
    datamodule.load_state_dict(ckpt[DATA])  # the same tokenizer and vocabulary, or an error that says which
    difference = differing(ckpt["state_dict"], model.state_dict())
    if difference:
        raise ValueError(
            f"--ckpt_path {path} does not fit this model: {difference} the config: use the config and flags it was "
            "trained with"
        )
    if fn == "fit" and (changes := changed_settings(ckpt, model, datamodule)):
        Console(stderr=True, soft_wrap=True, highlight=False).print(
            f"charlm: resuming with settings other than the checkpoint's: {', '.join(changes)}; the run goes on, "
            "not as it would have gone without the interruption"
        )
    template = {"epoch": 0, "loops": {f"{fn}_loop": getattr(trainer, f"{fn}_loop").state_dict()}}
    saved = ckpt.get("callbacks", {})
    template["callbacks"] = {c.state_key: c.state_dict() for c in trainer.callbacks if c.state_key in saved}
    if fn == "fit":
        trained_with, now = ckpt["hyper_parameters"].get("optimizer", "adamw"), model.hparams.optimizer
        if trained_with not in ("adamw", "muon"):
            raise ValueError(
                f"--ckpt_path {path} cannot be resumed (its optimizer is {str(trained_with)[:20]!r}, not adamw or "
                "muon): pass a .ckpt file charlm saved"
            )
        if trained_with != now:
            raise ValueError(
                f"--ckpt_path {path} was trained with --model.optimizer {trained_with}, this run's is {now}: resume "
                f"with --model.optimizer {trained_with}, or start from its weights with --model.init_from"
            )
        optimizer = model.make_optimizer()
        template["optimizer_states"] = [optimizer.state_dict()]
        template["lr_schedulers"] = [torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0).state_dict()]
        template["rng_states"] = {"torch": torch.get_rng_state(), "cuda": []}
    try:
        same_layout(ckpt, template, "")
        if fn == "fit":
            (state,) = ckpt["optimizer_states"]
            parts = getattr(optimizer, "parts", None) or {None: optimizer}  # MuonAndAdamW saves each part's state
            for name, part in parts.items():
                params = [p for g in part.param_groups for p in g["params"]]
                check_optimizer(state if name is None else state[name], params, part.param_groups)
            check_rng(ckpt["rng_states"])
    except ValueError as e:
        raise ValueError(f"--ckpt_path {path} cannot be resumed ({e}): pass a .ckpt file charlm saved") from None


def changed_settings(ckpt: dict, model, datamodule) -> list[str]:
    """The settings of a resumed fit that its checkpoint was trained with otherwise, as `--flag now (was then)`."""
    stream = ckpt[DATA].get("stream")
    stream = stream if isinstance(stream, dict) else {}
    pairs = {
        "--data.block_size": (stream.get("block_size"), datamodule.block_size),
        "--data.batch_size": (stream.get("batch_size"), datamodule.batch_size),
        "--seed_everything": (stream.get("seed"), torch.initial_seed()),
    }
    for key in ("lr", "min_lr", "warmup_steps", "weight_decay", "beta2", "muon_lr", "muon_weight_decay"):
        pairs[f"--model.{key}"] = (ckpt["hyper_parameters"].get(key), model.hparams[key])
    return [
        f"{flag} {now} (was {then})"
        for flag, (then, now) in pairs.items()
        if isinstance(then, int | float) and then != now
    ]


FLAG_SET = {"params", "lr", "initial_lr", "weight_decay", "betas", "fused", "foreach"}  # or chosen by the device


def check_optimizer(state: dict, params: list[torch.Tensor], groups: list[dict]) -> None:
    """Each moment (AdamW's, Muon's momentum) has the shape of the parameter it belongs to, indexed as the optimizer
    numbers them, and every setting that no flag sets is charlm's own (a step of 10^9 Newton-Schulz rounds would never
    end)."""
    if len(state["param_groups"]) != len(groups):
        raise ValueError(f"its optimizer has {len(state['param_groups'])} parameter groups, charlm's {len(groups)}")
    for saved, own in zip(state["param_groups"], groups):
        for key in own.keys() - FLAG_SET:
            if saved[key] != own[key]:
                raise ValueError(f"its optimizer's {key} is {str(saved[key])[:40]}, charlm's {own[key]}")
    for index, moments in state["state"].items():
        if not (isinstance(index, int) and 0 <= index < len(params)):
            raise ValueError(f"its optimizer state names parameter {str(index)[:40]!r} of {len(params)}")
        for name, moment in expect(moments, dict, "optimizer state").items():
            if expect(moment, torch.Tensor, f"optimizer {name}").dim() and moment.shape != params[index].shape:
                raise ValueError(f"its optimizer {name} of parameter {index} is {list(moment.shape)}")


def check_rng(rng: dict) -> None:
    for state in (rng["torch"], *rng["cuda"]):
        if expect(state, torch.Tensor, "generator state").dtype != torch.uint8:
            raise ValueError(f"its generator state is {state.dtype}, not uint8")
    if rng["torch"].shape != torch.get_rng_state().shape:
        raise ValueError(f"its generator state holds {rng['torch'].numel()} bytes, not {torch.get_rng_state().numel()}")


def checked_net(ckpt: dict, path: Path) -> tuple[type[Net], dict, Tokenizer]:
    """The class, init_args and tokenizer of a checkpoint's net, once they are known to describe its weights: each
    size at most the number of weights, no more layers than tensors, the net built without memory (on the meta
    device) and its weight names and shapes compared, its other buffers no larger than its weights."""
    net_config = ckpt["hyper_parameters"]["net"]
    cls = NETS[net_config["class_path"]]
    init_args = net_config["init_args"]
    if cls is GPT:
        init_args = {"pos_emb": "learned"} | init_args  # a GPT saved without pos_emb learned its positions
    weights = net_weights(ckpt)
    numel = sum(t.numel() for t in weights.values())
    sizes = {k: v for k, v in init_args.items() if isinstance(v, int) and v > numel}
    if init_args.get("n_layer", 0) > len(weights):
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
        raise ValueError(f"{path} is not a charlm checkpoint ({e}): pass a .ckpt file charlm saved") from None
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


def load_net(path: Path, device: torch.device | str = "cpu") -> tuple[Net, Tokenizer]:
    """The net (in eval mode) and the tokenizer stored in a charlm checkpoint (`checked_net`); nothing else is
    needed."""
    ckpt = read(path, device)
    cls, init_args, tokenizer = checked_net(ckpt, path)
    check_finite(ckpt, path)
    net = cls(**init_args)
    net.load_state_dict(net_weights(ckpt))
    return net.to(device).eval(), tokenizer


def adopt_architecture(config, given: dict, ckpt: dict, path: Path, flag: str) -> None:
    """Configure the net a checkpoint holds: its class, sizes and tokenizer, and its block_size and dropout unless
    `given` (what the config files and flags set) has them. A given class, size or tokenizer that differs from the
    checkpoint's is refused, naming both; so is a block_size beyond the positions a GPT learned."""
    cls, init_args, tokenizer = checked_net(ckpt, path)
    class_path = f"{cls.__module__}.{cls.__name__}"
    net = given.get("model", {}).get("net") or {}
    if net.get("class_path", class_path) != class_path:
        raise ValueError(
            f"{flag} {path} holds a {cls.__name__}, the config or flags give --model.net "
            f"{net['class_path'].rsplit('.', 1)[-1]}: drop it, the architecture comes from the checkpoint"
        )
    args = dict(init_args)
    for key, value in (net.get("init_args") or {}).items():
        if key == "dropout":  # how the net trains, not what it is
            args[key] = value
        elif key in args and key not in ("vocab_size", "block_size") and value != args[key]:
            raise ValueError(
                f"{flag} {path} holds a {cls.__name__} with {key}={args[key]}, the config or flags give "
                f"--model.net.init_args.{key} {value}: drop it, the architecture comes from the checkpoint"
            )
    data = given.get("data") or {}
    if data.get("tokenizer", tokenizer.name) != tokenizer.name:
        raise ValueError(
            f"{flag} {path} was trained with --data.tokenizer {tokenizer.name}, the config or flags give "
            f"{data['tokenizer']}: drop it, the tokenizer comes from the checkpoint"
        )
    config["data"]["tokenizer"] = tokenizer.name
    if "block_size" in args:
        if "block_size" not in data:
            config["data"]["block_size"] = args["block_size"]
        elif args.get("pos_emb") == "learned" and data["block_size"] > args["block_size"]:
            raise ValueError(
                f"--data.block_size {data['block_size']} is longer than the {args['block_size']} positions that "
                f"{flag} {path} learned: pass at most {args['block_size']}"
            )
        args["block_size"] = config["data"]["block_size"]
    config["model"]["net"] = Namespace(class_path=class_path, init_args=Namespace(**args))


def start_from(ckpt: dict, path: Path, net: Net, tokenizer: Tokenizer) -> list[str]:
    """Load a checkpoint's weights into `net`, a net of its architecture made for another text, and return the
    characters that are new to the checkpoint. A character both know keeps the checkpoint's embedding and output
    rows (a bigram's table entries); a new one keeps the fresh rows `net` was built with. Bytes are the same 256
    ids in every run: nothing is remapped."""
    theirs = tokenizer_from_state(ckpt[DATA])
    chars = tokenizer.chars if tokenizer.name == "chars" else [chr(i) for i in range(256)]
    ids = [theirs.stoi.get(c, -1) for c in chars] if tokenizer.name == "chars" else list(range(256))
    here = torch.tensor([i for i, id in enumerate(ids) if id >= 0], dtype=torch.long)
    known = torch.tensor([id for id in ids if id >= 0], dtype=torch.long)
    if not len(known):
        raise ValueError(
            f"none of the text's {len(chars)} characters is among the {theirs.vocab_size} that --model.init_from "
            f"{path} knows: there is nothing to start from; train from scratch (drop --model.init_from)"
        )
    weights, state = net_weights(ckpt), {}
    for name, fresh in net.state_dict().items():
        old, tensor = weights[name], fresh.clone()
        if name in ("wte.weight", "lm_head.weight"):
            tensor[here] = old[known]
        elif name == "table.weight":
            tensor[here[:, None], here] = old[known[:, None], known]
        else:  # a shorter block_size uses the first of the learned positions
            tensor = old[: len(tensor)] if name == "wpe.weight" else old
        state[name] = tensor
    net.load_state_dict(state)
    return [c for c, id in zip(chars, ids) if id < 0]
