"""`python -m charlm sweep`: hyperparameter search on Optuna, every trial a real `fit`.

A search space is a YAML mapping of fit flags (without the leading --) to distributions:

    model.lr: {low: 0.001, high: 0.03, log: true}      # a float range (log: sampled on a log scale)
    model.warmup_steps: {low: 0, high: 200, step: 50}  # ints when low and high are ints
    model.net.init_args.n_embd: {choices: [64, 96]}    # one of these values

Each trial runs `fit` in this process with the sampled flags on top of the sweep's config and flags, logs to
`sweeps/<study>/trial_N/` (TensorBoard's HPARAMS compares them), and reports every exact validation to Optuna, whose
pruner may stop it early. The objective is the trial's best exact val/loss (minimised). The study lives in an Optuna
storage (by default SQLite, `sweeps/<study>/study.db`): the same command again continues it, and several processes
(or machines, with a shared database) given the same storage work on it together until it holds `n_trials` trials.
"""

import datetime
import math
import os
import re
import shutil
import socket
import sys
import time
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Literal

import lightning as L
import yaml
from jsonargparse.typing import NonNegativeInt, PositiveInt

from charlm.cli import fit
from charlm.errors import first_line
from charlm.files import check_yaml, lock_folder

try:
    import optuna
    from optuna.trial import TrialState
except ImportError:  # an optional extra: the other commands do not need it
    optuna = None

SWEEPS = Path("sweeps")


@contextmanager
def storage_in_use(name: str, url: str, fix: str):
    """What the database or its driver raises, opening the study or at any moment after (a database spoiled, locked
    or removed under a running sweep), as one line naming the storage and the fix."""
    try:
        yield
    except Exception as e:
        # only the database's own errors are the storage's: a bad space, flag or file says what it is itself
        ours = isinstance(e, optuna.exceptions.StorageInternalError)
        if not ours and not type(e).__module__.startswith(("sqlalchemy", "sqlite3", "alembic", "optuna.storages")):
            raise
        raise ValueError(f"sweep {name}: its storage {url} cannot be used ({first_line(e)}): {fix}") from None


class Pruning(L.Callback):
    """Report each exact validation of a fit to its Optuna trial, and stop the fit when the study's pruner says so.

    `values` keeps what was reported: the trial's val losses by step.
    """

    def __init__(self, trial):
        self.trial = trial
        self.values: dict[int, float] = {}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        self.values[trainer.global_step] = float(trainer.callback_metrics["val/loss"])
        self.trial.report(self.values[trainer.global_step], trainer.global_step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {trainer.global_step}")


def median_pruner(startup_trials: int):
    """Stop a trial whose val loss at a step is worse than the median of the finished trials' at that step."""
    return optuna.pruners.MedianPruner(n_startup_trials=startup_trials)


def read_space(path: Path) -> dict:
    """The search space file as Optuna distributions, with one-line errors for what is not one."""
    try:
        space = yaml.safe_load(check_yaml(path, "--space"))
    except yaml.YAMLError as e:
        raise ValueError(f"--space {path}: cannot be read as YAML ({first_line(e)}): pass a space file") from None
    if not isinstance(space, dict) or not space:
        raise ValueError(f"--space {path} is not a mapping of flags to distributions: see configs/sweeps/cpu.yaml")
    distributions = {}
    for flag, spec in space.items():
        where = f"--space {path}: {flag}"
        if not isinstance(spec, dict):
            raise ValueError(f"{where} is {spec!r}: give {{low, high}} or {{choices: [...]}}")
        if "choices" in spec:
            if not isinstance(spec["choices"], list) or not spec["choices"]:
                raise ValueError(f"{where}: choices must be a non-empty list")
            distributions[flag] = optuna.distributions.CategoricalDistribution(spec["choices"])
            continue
        low, high = spec.get("low"), spec.get("high")
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high))
        if not numbers or not low <= high:
            raise ValueError(f"{where}: low and high must be numbers with low <= high, not {low!r} and {high!r}")
        log, step = bool(spec.get("log", False)), spec.get("step")
        try:
            if isinstance(low, int) and isinstance(high, int):
                distributions[flag] = optuna.distributions.IntDistribution(low, high, log=log, step=step or 1)
            else:
                distributions[flag] = optuna.distributions.FloatDistribution(low, high, log=log, step=step)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    return distributions


def owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def trial_id(storage, study: str, number: int) -> int:
    """A trial's id in a storage, which Optuna's trial objects keep private."""
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study), number)


NAMING = datetime.timedelta(minutes=1)  # far longer than a worker takes from asking for a trial to naming itself


def reap(study, storage, local: bool) -> None:
    """Fail the running trials of processes on this machine that are gone (killed): the study goes on without them.

    Called under the study folder's lock, which a worker also holds from asking for a trial until it names itself
    its owner: so in a study on this machine alone (`local`), a trial without an owner is one whose worker was
    killed in between. In a shared storage a worker elsewhere may be in between: its trial is taken for a killed
    one once it has had no owner for NAMING. (A trial of another machine that went down stays RUNNING.)
    """
    host, now = socket.gethostname(), datetime.datetime.now()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        machine, _, pid = str(trial.user_attrs.get("owner", "")).rpartition(":")
        gone = machine == host and pid.isdigit() and not Path(f"/proc/{pid}").exists()
        unnamed = "owner" not in trial.user_attrs and (local or now - trial.datetime_start > NAMING)
        if gone or unnamed:
            storage.set_trial_state_values(trial_id(storage, study.study_name, trial.number), TrialState.FAIL)


def counted(trial) -> bool:
    """Whether a trial counts toward n_trials: done, running, or failed on its own (not killed, not surplus)."""
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING) or (
        trial.state == TrialState.FAIL and "error" in trial.user_attrs
    )


def run_trial(trial, folder: Path, flags: list[str], keep_checkpoints: bool) -> float:
    """One fit with the trial's flags, its output in its folder's fit.log; its best exact val loss. Raises
    TrialPruned, or Failed with the fit's error."""
    name = f"trial_{trial.number}"
    if (folder / name).exists() or (folder / name).is_symlink():  # never two trials' curves in one folder
        raise FileExistsError(
            f"{folder / name}/ is there already, from another study of this name (another --storage?): "
            "pass --study with another name"
        )
    (folder / name).mkdir()
    pruning = Pruning(trial)
    where = {
        "trainer": {"logger": {"init_args": {"save_dir": str(folder), "name": name, "version": 0}}},
        "checkpoint": {"dirpath": str(folder / name / "checkpoints")},
    }
    try:
        with open(folder / name / "fit.log", "w") as log, redirect_stdout(log), redirect_stderr(log):
            fit(flags, callbacks=[pruning], **trial.params, **where)  # the sampled values, by their flags' names
    except optuna.TrialPruned:
        raise
    except (ValueError, OSError) as e:  # a one-line error of charlm's, a bad flag among them
        raise Failed(str(e).removeprefix("charlm fit: error: ")) from None
    except Exception as e:  # out of memory, or anything else a fit raises: that trial's, not the sweep's
        raise Failed(f"{type(e).__name__}: {first_line(e)}") from None
    finally:
        if not keep_checkpoints:
            shutil.rmtree(folder / name / "checkpoints", ignore_errors=True)
    if not pruning.values:
        raise Failed("the fit ran no validation: give --max_steps more than --trainer.val_check_interval")
    return min(pruning.values.values())


class Failed(Exception):
    """A trial's fit stopped with an error: recorded with its reason, and the sweep goes on."""


def sweep(
    space: str,
    config: str | None = None,
    fit: list[str] | None = None,
    n_trials: PositiveInt = 20,
    max_steps: PositiveInt | None = None,
    study: str | None = None,
    storage: str | None = None,
    sampler: Literal["tpe", "random"] = "tpe",
    seed: int | None = None,
    pruner_startup_trials: NonNegativeInt = 3,
    keep_checkpoints: bool = False,
    top: PositiveInt = 10,
    show_only: bool = False,
) -> None:
    """Search hyperparameters on Optuna: trials of `fit` with flags drawn from a space, pruned early when worse.

    Args:
        space: a YAML file mapping fit flags to distributions ({low, high, log, step} or {choices}).
        config: the fit config every trial starts from (--config of fit).
        fit: more fit flags for every trial, as a list: '["--data.path", "my.txt"]'.
        n_trials: trials the study should hold; a study that has them already only shows its table.
        max_steps: every trial's --trainer.max_steps: the budget.
        study: the study's name (default: the space file's name); its folder is sweeps/<study>/.
        storage: an Optuna storage URL (default: sqlite:///sweeps/<study>/study.db); a shared database
            (postgresql://..., mysql://...) lets workers on several machines share the study.
        sampler: tpe learns from finished trials; random does not.
        seed: the sampler's seed.
        pruner_startup_trials: trials that run to the end before the median pruner stops any.
        keep_checkpoints: keep every trial's checkpoints (by default removed: they are large).
        top: rows of the table of best trials.
        show_only: print the table of a study, in progress or finished, and run nothing.
    """
    if optuna is None:
        raise ValueError('charlm sweep needs Optuna: pip install -e ".[sweep]"')
    from charlm.study import best_config, best_so_far, show, values  # they read Optuna's trials

    asks = [flag for flag in fit or [] if flag in ("-h", "--help") or flag.split("=")[0] == "--print_config"]
    if asks:
        raise ValueError(
            f"{asks[0]} among the trials' fit flags would print instead of training: run python -m charlm fit "
            f"{asks[0]} on its own, then give the sweep only training flags"
        )
    if seed is not None and not 0 <= seed < 2**32:
        raise ValueError(f"--seed {seed} is outside what Optuna's samplers take, [0, {2**32 - 1}]: pass one inside")
    distributions = read_space(Path(space))
    name = study or Path(space).stem
    if not re.fullmatch(r"[\w.-]+", name) or name in (".", ".."):
        raise ValueError(
            f"--study {name}: a study is a folder in {SWEEPS}/: give a name without / (letters, digits, ._-)"
        )
    folder = SWEEPS / name
    url = storage or f"sqlite:///{folder / 'study.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    samplers = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}
    if show_only and storage is None and not (folder / "study.db").is_file():
        raise ValueError(f"--study {name}: there is no {folder / 'study.db'}: run the sweep first")
    fix = f"remove or repair {folder / 'study.db'}" if storage is None else "pass a --storage Optuna can open"
    with storage_in_use(name, url, fix):
        with lock_folder(folder):  # two workers starting at once would both create the tables
            rdb = optuna.storages.RDBStorage(url)
            options = {"sampler": samplers[sampler](seed=seed), "pruner": median_pruner(pruner_startup_trials)}
            if show_only:
                the_study = optuna.load_study(study_name=name, storage=rdb, **options)
            else:
                the_study = optuna.create_study(
                    storage=rdb, study_name=name, direction="minimize", load_if_exists=True, **options
                )
        flags = [*(["--config", config] if config else []), *(fit or [])]
        flags += [f"--trainer.max_steps={max_steps}"] if max_steps else []
        while not show_only:
            with lock_folder(folder):
                reap(the_study, rdb, local=storage is None)
                if sum(counted(t) for t in the_study.get_trials(deepcopy=False)) >= n_trials:
                    break
                try:
                    trial = the_study.ask(distributions)
                except ValueError as e:  # a flag's distribution changed since the study's first trials
                    raise ValueError(
                        f"--space {space} no longer matches sweep {name} ({e}): restore the space, or pass --study "
                        "with a new name"
                    ) from None
                trial.set_user_attr("owner", owner())
            ahead = [t for t in the_study.get_trials(deepcopy=False) if t.number < trial.number and counted(t)]
            if len(ahead) >= n_trials:  # another worker asked for the last trial in the same moment
                the_study.tell(trial, state=TrialState.FAIL)
                break
            print(
                f"charlm sweep: trial {trial.number} ({len(ahead) + 1} of {n_trials}) running, its output in "
                f"{folder / f'trial_{trial.number}' / 'fit.log'}",
                file=sys.stderr,
                flush=True,
            )
            start = time.monotonic()
            try:
                value = run_trial(trial, folder, flags, keep_checkpoints)
            except optuna.TrialPruned as e:
                the_study.tell(trial, state=TrialState.PRUNED)
                outcome = str(e)
            except Failed as e:
                trial.set_user_attr("error", str(e))
                the_study.tell(trial, state=TrialState.FAIL)
                outcome = f"failed: {e}"
            except BaseException:  # Ctrl-C, a kill: the trial is not the study's; the next run goes on without it
                the_study.tell(trial, state=TrialState.FAIL)
                raise
            else:
                the_study.tell(trial, value)
                outcome = f"val loss {value:.4f}"
            print(
                f"trial {trial.number:<3} {values(trial.params)}  {outcome}  {time.monotonic() - start:.1f} s"
                + best_so_far(the_study),
                flush=True,
            )
        show(the_study, distributions, top)
        if not any(t.state == TrialState.COMPLETE for t in the_study.get_trials(deepcopy=False)):
            raise ValueError(
                f"no trial of sweep {name} completed: see why above and in {folder}/trial_N/fit.log, then change "
                "the space or the flags"
            )
        best = the_study.best_trial
        path = best_config(folder, best) or folder / f"trial_{best.number}/version_0/config.yaml"
        if path.name != "best.yaml":
            print(f"charlm sweep: {folder / 'best.yaml'} was edited, so it is kept as it is", file=sys.stderr)
        print(f"charlm sweep: the best trial's config: {path} (python -m charlm fit --config {path})")
