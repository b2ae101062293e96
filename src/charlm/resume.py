"""A run that starts from checkpoints, planned once. `plan` resolves the file that --ckpt_path names (a resume, or
validate and test's score) and the one --model.init_from names (a fine-tune), reads and checks each once, and says
what the run must take from them (the net, the tokenizer, the block size) as config changes for the CLI to make.
`Plan.check` then holds them against the run built from the config, before any work: the vocabulary, the weights,
and for a resume the optimizer, schedule, loops and generators Lightning will restore, which it then takes from the
checked dict (`AtomicCheckpointIO.hand_over`), not from the file again.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from jsonargparse import Namespace

from charlm import runs
from charlm.checkpoints import DATA, check_finite, checked_net, differing, expect, net_weights, read, resolve
from charlm.models import Net
from charlm.saving import AtomicCheckpointIO
from charlm.tokenizers import Tokenizer, tokenizer_from_state, visible


@dataclass
class Plan:
    """The checkpoints a run starts from, read and checked, and the config changes they make."""

    path: Path | None = None  # --ckpt_path's file: what Lightning restores
    ckpt: dict | None = None
    source: Path | None = None  # --model.init_from's file: the weights a new run starts from
    start: dict | None = None
    changes: dict = field(default_factory=dict)  # config key -> the value the run must take

    def check(self, command: str, trainer: L.Trainer, model, datamodule) -> list[str]:
        """Hold the checkpoints against the run that was built, load a fine-tune's weights, hand a resume's dict to
        Lightning; the lines the run should tell."""
        notes = []
        if self.ckpt is not None:
            notes += check_fits(self.ckpt, self.path, command, trainer, model, datamodule)
            if isinstance(io := trainer.strategy.checkpoint_io, AtomicCheckpointIO):  # unless --trainer.plugins said
                io.hand_over(self.path, self.ckpt)
        if self.start is not None:
            new = start_from(self.start, self.source, model.net, datamodule.tokenizer)
            about = "it knows every character of this text"
            if new:
                shown = ": " + " ".join(visible(c) for c in new) if len(new) <= 20 else ""
                about = f"{len(new)} of this text's {datamodule.vocab_size} characters are new to it"
                about += f" and start untrained{shown}"
            notes.append(f"charlm: starting from {self.source} (step {self.start['global_step']}): {about}")
        return notes


def plan(command: str, config, given: dict) -> Plan:
    """The checkpoints `config` (fit, validate or test's) names, read and checked once, and what they change in it;
    `given` is what its config files and flags set, which a checkpoint's net must agree with."""
    result = Plan()
    if config.get("ckpt_path") is not None:
        folder = config["checkpoint"]["dirpath"] or Path("checkpoints", runs.run_name(config))
        result.path = resolve(config["ckpt_path"], Path(folder))
        result.ckpt = read(result.path)
        result.changes["ckpt_path"] = str(result.path)
    elif command != "fit":
        raise ValueError(f"{command} scores a trained checkpoint: pass --ckpt_path last, best or a .ckpt file")
    init_from = config["model"]["init_from"]
    if result.ckpt is not None and command == "fit":
        # a resumed run records what its checkpoint does: where the weights it was started from came from
        recorded = result.ckpt["hyper_parameters"].get("init_from")
        resumes_it = init_from in (None, recorded) or (
            recorded is not None
            and Path(recorded).is_file()
            and resolve(init_from, Path("checkpoints"), "--model.init_from").samefile(recorded)
        )
        if not resumes_it:
            raise ValueError(
                f"--model.init_from {init_from} and --ckpt_path {config['ckpt_path']} both given: --ckpt_path "
                "resumes the run it names, --model.init_from starts a new one from a checkpoint's weights: drop one"
            )
        result.changes["model.init_from"] = recorded
    elif init_from is not None and command == "fit":
        result.source = resolve(init_from, Path("checkpoints"), "--model.init_from")
        result.start = read(result.source)
        check_finite(result.start, result.source)
        result.changes["model.init_from"] = str(result.source)
    block_size = config["data"]["block_size"]
    if result.ckpt is not None:
        result.changes |= architecture(block_size, given, result.ckpt, result.path, "--ckpt_path")
    elif result.start is not None:
        result.changes |= architecture(block_size, given, result.start, result.source, "--model.init_from")
    return result


def architecture(block_size: int, given: dict, ckpt: dict, path: Path, flag: str) -> dict:
    """The config the net a checkpoint holds needs: its class, sizes and tokenizer, and its block_size and dropout
    unless `given` (what the config files and flags set) has them. A given class, size or tokenizer that differs from
    the checkpoint's is refused, naming both; so is a block_size beyond the positions a GPT learned."""
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
    changes = {"data.tokenizer": tokenizer.name}
    if "block_size" in args:
        if "block_size" not in data:
            block_size = changes["data.block_size"] = args["block_size"]
        elif args.get("pos_emb") == "learned" and data["block_size"] > args["block_size"]:
            raise ValueError(
                f"--data.block_size {data['block_size']} is longer than the {args['block_size']} positions that "
                f"{flag} {path} learned: pass at most {args['block_size']}"
            )
        args["block_size"] = block_size
    return changes | {"model.net": Namespace(class_path=class_path, init_args=Namespace(**args))}


def check_fits(ckpt: dict, path: Path, fn: str, trainer: L.Trainer, model, datamodule: L.LightningDataModule) -> list:
    """Fail before any work if a checkpoint does not fit the configured run: its vocabulary, its weight shapes, and
    what Lightning's `fn` (fit, validate or test) restores from it: loops, callback states, and to resume training
    the optimizer, the schedule and the generators. A resume with other optimizer settings takes them: the
    checkpoint as read (not its file) is given them. Returns what the run should be told."""
    datamodule.load_state_dict(ckpt[DATA])  # the same tokenizer and vocabulary, or an error that says which
    difference = differing(ckpt["state_dict"], model.state_dict())
    if difference:
        raise ValueError(
            f"--ckpt_path {path} does not fit this model: {difference} the config: use the config and flags it was "
            "trained with"
        )
    notes = []
    if fn == "fit" and (changes := changed_settings(ckpt, model, datamodule)):
        notes.append(
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
            peaks = ckpt["lr_schedulers"][0]["base_lrs"]
            if len(peaks) != len(optimizer.param_groups) or not all(
                type(lr) is float and 0 < lr < math.inf for lr in peaks
            ):
                raise ValueError(f"its schedule's base_lrs {str(peaks)[:60]} are not one learning rate > 0 per group")
            if changes:
                take_settings(ckpt, optimizer)
    except ValueError as e:
        raise ValueError(f"--ckpt_path {path} cannot be resumed ({e}): pass a .ckpt file charlm saved") from None
    return notes


def take_settings(ckpt: dict, optimizer: torch.optim.Optimizer) -> None:
    """Give a checkpoint's optimizer and schedule the settings that flags set (peak learning rates, weight decay,
    betas) from a fresh `optimizer` of this run's: Lightning restores both after configure_optimizers, and would
    otherwise train on with the old ones. The learning rate keeps its place in the schedule."""
    (state,), (schedule,) = ckpt["optimizer_states"], ckpt["lr_schedulers"]
    parts = getattr(optimizer, "parts", None) or {None: optimizer}
    saved = [g for name in parts for g in (state if name is None else state[name])["param_groups"]]
    for group, fresh, then in zip(saved, optimizer.param_groups, schedule["base_lrs"]):
        group["lr"] *= fresh["lr"] / then  # the same factor of the new peak
        group["initial_lr"] = fresh["lr"]
        group.update({key: fresh[key] for key in ("weight_decay", "betas") if key in fresh})
    schedule["base_lrs"] = [g["lr"] for g in optimizer.param_groups]
    schedule["_last_lr"] = [g["lr"] for g in saved]


def changed_settings(ckpt: dict, model, datamodule) -> list[str]:
    """The settings of a resumed fit that its checkpoint was trained with otherwise, as `--flag now (was then)`, and
    the text, if it changed and kept its vocabulary (another vocabulary is refused)."""
    stream = ckpt[DATA].get("stream")
    stream = stream if isinstance(stream, dict) else {}
    pairs = {
        "--data.block_size": (stream.get("block_size"), datamodule.block_size),
        "--data.batch_size": (stream.get("batch_size"), datamodule.batch_size),
        "--seed_everything": (stream.get("seed"), torch.initial_seed()),
    }
    for key in ("lr", "min_lr", "warmup_steps", "weight_decay", "beta2", "muon_lr", "muon_weight_decay"):
        pairs[f"--model.{key}"] = (ckpt["hyper_parameters"].get(key), model.hparams[key])
    changes = [
        f"{flag} {now} (was {then})"
        for flag, (then, now) in pairs.items()
        if isinstance(then, int | float) and then != now
    ]
    if isinstance(stream.get("text"), str) and stream["text"] != datamodule.text_digest:  # the same vocabulary
        was = f"{stream['tokens']:,}" if type(stream.get("tokens")) is int else "other"
        text = datamodule.path or "tiny-shakespeare"
        changes.append(f"--data.path {text} (its text changed: {datamodule.corpus.meta['tokens']:,} tokens, was {was})")
    return changes


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
            shape = () if name == "step" else params[index].shape  # a step count, else one value per weight
            if expect(moment, torch.Tensor, f"optimizer {name}").shape != shape:
                raise ValueError(f"its optimizer {name} of parameter {index} is {list(moment.shape)}")


def check_rng(rng: dict) -> None:
    for state in (rng["torch"], *rng["cuda"]):
        if expect(state, torch.Tensor, "generator state").dtype != torch.uint8:
            raise ValueError(f"its generator state is {state.dtype}, not uint8")
    if rng["torch"].shape != torch.get_rng_state().shape:
        raise ValueError(f"its generator state holds {rng['torch'].numel()} bytes, not {torch.get_rng_state().numel()}")


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
