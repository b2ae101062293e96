"""Where a run goes: `logs/<name>/version_N/` for its curves (`RunLogger`) beside `checkpoints/<name>/version_N/`
for its checkpoints, with the same N (`place_run`); `<name>` from the config's file and the text (`run_name`)."""

from pathlib import Path

from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.tensorboard.summary import hparams

from charlm.files import LOCK


class RunLogger(TensorBoardLogger):
    """TensorBoardLogger without the `epoch` curve (charlm counts steps) and `hp_metric`; its HPARAMS are the
    run's settings (`Report`), not Lightning's nested hyperparameters."""

    def __init__(
        self,
        save_dir: str = "logs",
        name: str | None = None,
        version: int | None = None,
        purge_step: int | None = None,
        **kwargs,
    ):
        # purge_step (set by `place_run` on resume) is named here: jsonargparse does not always follow **kwargs to it
        super().__init__(save_dir, name=name, version=version, default_hp_metric=False, purge_step=purge_step, **kwargs)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        super().log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step)

    def log_hyperparams(self, params, metrics=None) -> None:
        """Lightning's call, with the raw hyperparameters: `log_settings` writes what sets runs apart instead."""

    def log_settings(self, settings: dict) -> None:
        writer = self.experiment
        # the HPARAMS table's metric column reads the val/best_loss curve
        for summary in hparams(settings, {"val/best_loss": 0}):
            writer.file_writer.add_summary(summary)
        writer.add_custom_scalars(
            {
                "charlm": {
                    "loss (train and val)": ["Multiline", ["train/loss", "val/loss"]],
                    "val bits per character": ["Multiline", ["val/bpc"]],
                    "learning rate": ["Multiline", ["train/lr"]],
                    "tokens/s": ["Multiline", ["train/tokens_per_sec"]],
                }
            }
        )


LOGGERS = ("charlm.runs.RunLogger", "lightning.pytorch.loggers.TensorBoardLogger")


def tensorboard(logger) -> dict | None:
    """The init_args of a TensorBoard logger's config; None for another logger or none."""
    if isinstance(logger, bool | list | None) or logger.get("class_path") not in LOGGERS:
        return None
    return logger["init_args"]


def run_name(config) -> str:
    """The name a run's folders have: the logger's name when one is given, else the config's file name, with the
    text's name after it when the text is not tiny-shakespeare, so that runs on different texts never mix."""
    init = tensorboard(config["trainer"]["logger"])
    if init is not None and init.get("name"):
        return init["name"]
    name = Path(str(config["config"][-1])).stem if config.get("config") else "default"
    return f"{name}-{Path(config['data']['path']).stem}" if config["data"]["path"] else name


def place_run(config, ckpt: dict | None, ckpt_path: Path | None) -> tuple[Path, Path] | None:
    """Point a fit at its folders, logs/<name>/version_N/ and checkpoints/<name>/version_N/ with the same N: the next
    free N for a new run, the checkpoint's own folders for a resumed one (purge_step hides what that run logged after
    the checkpoint, so every step appears once). An explicit --checkpoint.dirpath or logger version is kept. Returns
    what a new run claimed (`claim`), for `release` should the run be refused."""
    init, name = tensorboard(config["trainer"]["logger"]), run_name(config)
    claimed = None
    if ckpt is not None:
        version = ckpt.get("log_version")
        folder = ckpt_path.parent
    else:
        runs = [
            *Path(init["save_dir"] if init else "logs", name).glob("version_*"),
            *Path("checkpoints", name).glob("version_*"),
        ]
        taken = [int(run.name[8:]) for run in runs if run.name[8:].isdigit()]
        version = max(taken, default=-1) + 1
        auto = config["checkpoint"]["dirpath"] is None and (init is None or init.get("version") is None)
        if auto and rank_zero_only.rank == 0:  # other ranks save nothing
            claimed = claim(Path("checkpoints", name), version)
            version = int(claimed[0].name[8:])
        folder = Path("checkpoints", name, f"version_{version}")
    if init is not None:
        init["name"] = name
        given = Path(init.get("save_dir") or "logs", name, f"version_{init.get('version')}")
        if ckpt is None and init.get("version") is not None and any(given.glob("events.out.tfevents.*")):
            raise FileExistsError(
                f"--trainer.logger.init_args.version {init['version']}: {given}/ holds the curves of an earlier run: "
                "leave the version out (a new run takes the next free one), or resume that run with --ckpt_path"
            )
        if init.get("version") is None and version is not None:
            init["version"] = version
            if ckpt is not None:
                init["purge_step"] = int(ckpt.get("global_step", 0))
    if config["checkpoint"]["dirpath"] is None:
        config["checkpoint"]["dirpath"] = str(folder)
    return claimed


def claim(parent: Path, version: int) -> tuple[Path, Path]:
    """The folder of the first version from `version` on that this process makes (runs started at once never share
    one), and the topmost folder it made for it."""
    missing = [folder for folder in (parent, *parent.parents) if not folder.exists()]
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            (parent / f"version_{version}").mkdir()  # atomic: of two processes, one makes it
            break
        except FileExistsError:
            version += 1
    return parent / f"version_{version}", missing[-1] if missing else parent / f"version_{version}"


def release(claimed: tuple[Path, Path] | None) -> None:
    """Remove what `claim` made if the run left it as it was made (the run was refused): its version folder, holding
    at most charlm's lock, and the folders made for it that are empty now (another run's make them not)."""
    if claimed is None:
        return
    folder, made = claimed
    try:
        if {p.name for p in folder.iterdir()} <= {LOCK}:
            (folder / LOCK).unlink(missing_ok=True)
            for empty in (folder, *folder.parents[: len(folder.parents) - len(made.parents)]):
                empty.rmdir()
    except OSError:  # gone, or not empty: another run's, or written meanwhile
        pass
