"""The trackers users already watch: TensorBoard, trackio and Weights & Biases, fed from the run record.

``--report-to tensorboard`` (or ``report_to=`` in a config) sends every metrics row to the tracker too, under the
same names as ``metrics.jsonl`` (``loss/policy``, ``reward/mean``, ``kl/ref``…) and at the same step. The JSONL file
stays the record: a row reaches the tracker only after it is on disk, and a tracker that fails mid-run is dropped
with one warning while training goes on. Where each one writes:

    tensorboard   <run>/tensorboard/ (events files):  tensorboard --logdir runs
    trackio       trackio's local project "lab" (TRACKIO_PROJECT):  trackio show --project lab
    wandb         W&B project "lab" (WANDB_PROJECT); offline runs in <run>/wandb/:  wandb sync <run>/wandb/offline-run-*

A tracker that cannot work here fails when the config is made, before any model loads, in one line: its package is
not installed, or W&B has no login and is not offline (``WANDB_MODE=offline``). A resumed run goes on in the same
TensorBoard folder (the events after the resumed step are purged), and the same trackio and W&B run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from lab.errors import ConfigError

TRACKERS = ("none", "tensorboard", "trackio", "wandb")
_PACKAGES = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb"}
_OFFLINE = ("offline", "disabled", "dryrun")


def check_tracker(name: str) -> None:
    """Raise ConfigError (one line) unless ``name`` can report from here: one of ``TRACKERS``, its package
    installed, and for wandb a login (``wandb login``, ``WANDB_API_KEY``) or ``WANDB_MODE=offline``."""
    if name not in TRACKERS:
        raise ConfigError(f"report_to: must be one of {', '.join(TRACKERS)}, got {name!r}")
    if name == "none":
        return
    package = _PACKAGES[name]
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"report_to: {name} is not installed; pip install {package}, or use --report-to none")
    mode = os.environ.get("WANDB_MODE", "").lower()
    if name == "wandb" and mode not in ("", "online", "run", "shared", *_OFFLINE):
        raise ConfigError(f"report_to: WANDB_MODE={mode!r} is not a wandb mode; use online, offline or disabled")
    if name == "wandb" and mode not in _OFFLINE:
        import wandb

        if not wandb.login(prompt=False, verify=False):
            raise ConfigError(
                "report_to: wandb is not logged in; run `wandb login`, set WANDB_API_KEY, or set "
                "WANDB_MODE=offline to write the run locally"
            )


def open_tracker(name: str, record, config: dict, resumed_from: int | None = None):
    """The tracker ``name`` for ``record`` (a lab.records.RunRecord), or None for "none". ``config``: what the run's
    config.json holds; ``resumed_from``: the step a resumed run goes on from."""
    check_tracker(name)
    if name == "none":
        return None
    config = {k: v for k, v in config.items() if k != "meta"}
    if name == "tensorboard":
        return TensorBoardTracker(Path(record.path) / "tensorboard", resumed_from)
    if name == "trackio":
        return TrackioTracker(record, config, resumed_from)
    return WandbTracker(record, config, resumed_from)


def tracker_run_id(record) -> str:
    """A run id for trackio and W&B that stays the same when the run is resumed and differs between two run folders
    of the same name: the folder's name and a hash of its path and creation time."""
    started = record.status.get("started", "")  # kept when the run is resumed
    digest = hashlib.sha1(f"{Path(record.path).resolve()}|{started}".encode()).hexdigest()[:8]
    return f"{record.run_id[:55]}-{digest}"


def _wandb_mode() -> str | None:
    """WANDB_MODE as read now (wandb itself reads it once, when it is first set up in a process)."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    return {"dryrun": "offline"}.get(mode, mode) if mode in (*_OFFLINE, "online") else None


class TensorBoardTracker:
    """Scalars in ``<run>/tensorboard/``, written with torch's ``SummaryWriter`` and flushed at every row, so a
    killed run's events are on disk up to its last step."""

    def __init__(self, logdir: Path, resumed_from: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = Path(logdir)
        # purge_step: a resumed run drops the events a killed run wrote after its checkpoint, as metrics.jsonl does
        purge = resumed_from + 1 if resumed_from is not None else None
        self.writer = SummaryWriter(log_dir=str(self.logdir), purge_step=purge)

    def log(self, metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def __repr__(self) -> str:
        return f"tensorboard ({self.logdir})"


class TrackioTracker:
    """A run of trackio's local project ``TRACKIO_PROJECT`` (default "lab"), named after the run folder."""

    def __init__(self, record, config: dict, resumed_from: int | None = None):
        import trackio

        self.run = trackio.init(
            project=os.environ.get("TRACKIO_PROJECT", "lab"),
            name=tracker_run_id(record),
            config=config,
            resume="allow" if resumed_from is not None else "never",
            embed=False,
            auto_log_cpu=False,
            auto_log_gpu=False,
        )

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()

    def __repr__(self) -> str:
        return "trackio"


class WandbTracker:
    """A W&B run in project ``WANDB_PROJECT`` (default "lab"), its local files in ``<run>/wandb/``. W&B keeps the
    first value logged at a step: a resumed run's steps that a killed run had already sent stay as they were there
    (metrics.jsonl has the resumed ones)."""

    def __init__(self, record, config: dict, resumed_from: int | None = None):
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "lab"),
            name=record.run_id,
            id=tracker_run_id(record),
            config=config,
            dir=str(record.path),
            resume="allow" if resumed_from is not None else None,
            mode=_wandb_mode(),
        )

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()

    def __repr__(self) -> str:
        return "wandb"
