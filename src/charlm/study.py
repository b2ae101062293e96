"""What a sweep's study has found, as the sweep shows and keeps it: a line per trial, the table of the best trials,
and the best trial's config written as `sweeps/<study>/best.yaml`, a config that `fit --config` runs as is."""

import hashlib
from pathlib import Path

import yaml
from optuna.trial import TrialState
from rich.console import Console
from rich.table import Table

from charlm.errors import first_line
from charlm.files import atomic_write, check_yaml


def best_config(folder: Path, trial) -> Path | None:
    """Write the best trial's config as one that `fit --config` runs as is (its own logs and checkpoints), unless a
    best.yaml is there that charlm did not write as it is (a person edited it): then None."""
    saved = folder / f"trial_{trial.number}/version_0/config.yaml"
    try:
        config = yaml.safe_load(check_yaml(saved, "the best trial's config"))
        config["trainer"]["logger"]["init_args"] |= {"save_dir": "logs", "name": None, "version": None}
        config["checkpoint"]["dirpath"] = None
        config["ckpt_path"] = None
    except (TypeError, KeyError, yaml.YAMLError) as e:  # edited since the trial wrote it
        raise ValueError(
            f"{saved} is not the config a trial writes ({type(e).__name__}: {first_line(e)}): restore it, or run the "
            "best trial's settings by hand"
        ) from None
    path = folder / "best.yaml"
    if (path.exists() or path.is_symlink()) and not written_by_charlm(path):
        return None
    body = yaml.safe_dump(config, sort_keys=False)
    header = f"# the best trial of sweep {folder.name}: trial {trial.number}, best exact val loss {trial.value:.4f}\n"
    header += f"# charlm rewrites this file unless it is edited ({digest(body)})\n"
    with atomic_write(path, "w") as f:
        f.write(header + body)
    return path


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def written_by_charlm(path: Path) -> bool:
    """Whether a best.yaml is a regular file whose body still has the digest its header gives."""
    if path.is_symlink() or not path.is_file():
        return False
    lines = path.read_text(errors="replace").split("\n", 2)
    return len(lines) == 3 and lines[1].endswith(f"({digest(lines[2])})")


def show(study, space: dict, top: int) -> None:
    trials = study.get_trials(deepcopy=False)
    done = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    states = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
    table = Table(title=f"sweep {study.study_name}: {', '.join(f'{n} {s}' for s, n in states.items() if n)}")
    short = [flag.rsplit(".", 1)[-1] for flag in space]  # lr, n_embd: a table that fits a terminal
    for column in ("trial", "val loss", *(short if len(set(short)) == len(short) else space), "seconds"):
        table.add_column(column, justify="right")
    for trial in done[:top]:
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
        params = [brief(trial.params.get(k, "")) for k in space]  # a flag the space gained since: blank
        table.add_row(str(trial.number), f"{trial.value:.4f}", *params, f"{seconds:.1f}")
    Console().print(table)
    for trial in trials:
        if trial.state == TrialState.FAIL and "error" in trial.user_attrs:
            print(f"trial {trial.number} failed: {trial.user_attrs['error']}")


def brief(value) -> str:
    """A sampled value as the table and the trial lines show it: floats to 3 digits."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def values(params: dict) -> str:
    """A trial's sampled flags by their last names: `lr=0.0123 n_head=2`."""
    return " ".join(f"{k.rsplit('.', 1)[-1]}={brief(v)}" for k, v in params.items())


def best_so_far(study) -> str:
    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not done:
        return ""
    best = min(done, key=lambda t: t.value)
    return f"   best so far {best.value:.4f} (trial {best.number})"
