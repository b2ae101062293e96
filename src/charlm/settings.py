"""How a trained model is run: the device, and the generation settings, declared once: what `charlm generate`, the
training-time samples (`--generation.*`), the playground's API and its page (which reads them from `GET /api/runs`)
all take, with their defaults, bounds and one-line refusals.

A setting is a field of `Sampling` with its bounds (`bounded`); `check` refuses a value outside them in the same
words everywhere, only the name said the way the surface says it (`--temperature`, `--generation.temperature`,
`temperature`). The API's other request bodies are dataclasses of such fields too, checked by the same code.
"""

import json
import math
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Literal

Device = Literal["auto", "cpu", "cuda", "mps"]
KINDS = {str: "a string", int: "a whole number", float: "a finite number", list: "a list"}  # as JSON says them


def bounded(default, low=-math.inf, high=math.inf, above: bool = False):
    """A field whose value (a string's or list's length) lies in [low, high], or (low, high] when above; null is
    allowed where the type says so."""
    return field(default=default, metadata={"low": low, "high": high, "above": above})


@dataclass(eq=False)  # eq=False: a callback subclasses it, and Lightning keeps callbacks hashable
class Sampling:
    """How text is drawn from a model.

    Args:
        prompt: the text to continue (empty: a newline, or the first character of a vocabulary that has none).
        max_new_tokens: characters to generate (0: none).
        temperature: 0 is greedy: the most likely character every time.
        top_k: sample among the k most likely characters (null: all).
        top_p: nucleus: sample among the smallest set of characters whose probability reaches p (null: all).
        seed: the same seed, checkpoint, settings and device give the same text.
        unknown: what to do with prompt characters the model never saw: refuse the prompt, or skip them.
    """

    prompt: str = bounded("", low=0)
    max_new_tokens: int = bounded(500, low=0)
    temperature: float = bounded(0.8, low=0)
    top_k: int | None = bounded(None, low=1)
    top_p: float | None = bounded(None, low=0, high=1, above=True)
    seed: int = bounded(1337, low=-(2**63), high=2**64 - 1)  # what torch.Generator.manual_seed takes
    unknown: Literal["error", "skip"] = "error"

    def usable_prompt(self, tokenizer, prefix: str) -> str:
        """The prompt as the model reads it (`known_text`); `prefix` is how the surface names the settings."""
        return known_text(tokenizer, self.prompt, f"{prefix}prompt", f"{prefix}unknown skip", self.unknown == "skip")


def known_text(tokenizer, text: str, name: str, skip: str | None = None, drop: bool = False) -> str:
    """`text` as a model reads it: without the characters the model never saw when `drop`, else refused if it has
    any (`skip` is the setting that would drop them, where there is one); `empty_prompt` when nothing is left."""
    from charlm.tokenizers import empty_prompt

    missing = tokenizer.unknown(text)
    if missing and not drop:
        raise ValueError(
            f"{name} has characters {missing[:10]!r} that are not among the model's {tokenizer.vocab_size}: change "
            f"it{f', or pass {skip} to drop them' if skip else ''}"
        )
    return "".join(c for c in text if c not in set(missing)) or empty_prompt(tokenizer)


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


def check(settings, prefix: str = "", limits: dict | None = None) -> None:
    """Refuse, in one line, the first field of a dataclass of settings whose value is not of its type or outside its
    bounds; `limits` lowers some upper bounds (a server's), `prefix` is how the surface names them."""
    limits = limits or {}
    for f in fields(settings):
        value, said = getattr(settings, f.name), f"{prefix}{f.name} {shorten(getattr(settings, f.name))}"
        kind, optional = typing.get_origin(f.type) or f.type, False
        if kind in (typing.Union, types.UnionType):
            inner = [t for t in typing.get_args(f.type) if t is not type(None)]
            kind, optional = typing.get_origin(inner[0]) or inner[0], True
        if value is None and optional:
            continue
        if kind is Literal:
            choices = typing.get_args(f.type)
            if value not in choices:
                raise ValueError(f"{said} is not one of {', '.join(map(json.dumps, choices))}")
            continue
        # a whole number is a float, a bool is no number, and infinity or NaN is no setting
        if not (type(value) is kind or (kind is float and type(value) is int)) or (
            kind is float and not math.isfinite(value)
        ):
            raise ValueError(f"{said} is not {KINDS[kind]}")
        low, high, above = (f.metadata.get(k, d) for k, d in (("low", -math.inf), ("high", math.inf), ("above", False)))
        high = min(high, limits.get(f.name, math.inf))
        size = len(value) if kind in (str, list) else value
        if not (low < size if above else low <= size) or not size <= high:
            what = f"{prefix}{f.name} has length {size}," if kind in (str, list) else f"{said} is"
            raise ValueError(f"{what} outside {'(' if above else '['}{number(low)}, {number(high)}]")


def from_json(cls, given: dict, limits: dict | None = None):
    """A dataclass of settings from a request's JSON object: no field it does not have, each value checked."""
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ValueError(f"unknown field {unknown[0][:100]!r}: the fields are {', '.join(names)}")
    # null is the default, as a missing field is
    settings = cls(**{name: value for name, value in given.items() if value is not None})
    check(settings, "", limits)
    return settings


def describe(cls, limits: dict | None = None) -> dict:
    """Each field's default and bounds, for a page that offers them (JSON: infinity is null)."""
    limits, out = limits or {}, {}
    for f in fields(cls):
        high = min(f.metadata.get("high", math.inf), limits.get(f.name, math.inf))
        low = f.metadata.get("low", -math.inf)
        out[f.name] = {
            "default": None if f.default is MISSING else f.default,
            "min": low if math.isfinite(low) else None,
            "max": high if math.isfinite(high) else None,
            "above": f.metadata.get("above", False),
        }
    return out


def number(bound: float) -> str:
    return "inf" if bound == math.inf else "-inf" if bound == -math.inf else str(bound)


def shorten(value) -> str:
    text = json.dumps(value, default=repr)  # a value from Python may be no JSON
    return text if len(text) <= 60 else text[:57] + "..."
