"""Experiment tracking: TensorBoard (built in), Weights & Biases and MLflow (optional extras).

A tracker receives, once per run, the resolved config and the taxonomy fingerprint,
then one row of scalars per epoch (``step`` = the epoch number), optional free text
and files, and finally the run status. Trackers are created by name from a
registry, like heads and losses::

    trackers = create_trackers(["tensorboard", "mlflow"], {"mlflow": {"experiment": "plankton"}})

and driven by :class:`~taxonomist.train.logger.MetricLogger`, which also writes
``metrics.csv``. An unknown name or option is a :class:`~taxonomist.errors.ConfigError`;
a tracker whose package is not installed is a
:class:`~taxonomist.errors.MissingExtraError` with the pip command (never a silent
fallback).

Resume: ``start(..., start_epoch=N)`` with ``N > 0`` means the training continues
from the checkpoint of epoch N. W&B and MLflow keep the id of their run in
``<run_dir>/tracking.json`` and continue that same run; TensorBoard drops the events
a killed run wrote after epoch N. ``start`` returns whether the earlier epochs are
already in the tracker; when it returns ``False`` (e.g. a tracker added to a run
that is resumed) the logger replays the history from the checkpoint.

Add a tracker with ``@register_tracker("name")`` on a :class:`Tracker` subclass whose
constructor takes its options as keyword arguments (they come from
``train.tracking_options.<name>``) and imports its package (see :func:`require`).
See docs/tracking.md.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, Literal

import yaml

from ..errors import ConfigError, MissingExtraError
from ..models.registry import Registry
from ..utils.io import atomic_write_json

Status = Literal["finished", "failed", "killed"]
STATUSES = ("finished", "failed", "killed")
TRACKING_FILE = "tracking.json"

TRACKERS: Registry[Tracker] = Registry("tracker")


def register_tracker(name: str):
    """Class decorator registering a :class:`Tracker` subclass under ``name``."""
    return TRACKERS.register(name)


def list_trackers() -> list[str]:
    """Names of the registered trackers."""
    return TRACKERS.names()


def tracker_options(name: str) -> dict[str, Any]:
    """Options of a tracker with their defaults."""
    return TRACKERS.options(name)


def check_tracking_config(names: Iterable[str], options: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Validate tracker names and options without importing any tracking package.

    Raises ConfigError for an unknown tracker (in ``names`` or as a key of ``options``),
    a name listed twice, or an option the tracker does not have. Options of registered
    trackers that are not in ``names`` are checked too (so a typo is caught before the
    tracker is switched on) but otherwise ignored.
    """
    names = list(names)
    seen: set[str] = set()
    for n in names:
        TRACKERS.get(n)
        if n in seen:
            raise ConfigError(f"train.tracking lists {n!r} twice")
        seen.add(n)
    for n, opts in (options or {}).items():
        TRACKERS.get(n)
        if opts is None:
            continue
        if not isinstance(opts, Mapping):
            raise ConfigError(f"train.tracking_options.{n} must be a mapping of options, got {opts!r}")
        allowed = set(tracker_options(n))
        unknown = sorted(set(opts) - allowed)
        if unknown:
            raise ConfigError(f"tracker {n!r} has no option(s) {', '.join(map(repr, unknown))}; "
                              f"its options are: {', '.join(sorted(allowed)) or '(none)'}")


def create_trackers(names: Iterable[str], options: Mapping[str, Mapping[str, Any]] | None = None) -> list[Tracker]:
    """Build the trackers listed in ``names`` (in order) with ``options[name]`` as keyword options.

    Cheap: this validates and imports the packages but starts nothing, so call it
    before long work to fail early. Unknown names/options raise ConfigError; a
    missing package raises MissingExtraError.
    """
    names = list(names)
    options = dict(options or {})
    check_tracking_config(names, options)
    return [TRACKERS.create(n, **dict(options.get(n) or {})) for n in names]


def require(package: str, extra: str, feature: str) -> ModuleType:
    """Import ``package`` or raise MissingExtraError naming the ``taxonomist[extra]`` to install."""
    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise MissingExtraError(package, extra, feature) from exc


class Tracker:
    """Base class. Subclasses implement :meth:`start`, :meth:`log_metrics` and :meth:`finish`;
    :meth:`log_text` and :meth:`log_artifact` default to doing nothing."""

    registry_name: ClassVar[str] = ""

    def start(self, run_dir: Path, *, run_name: str, config: Mapping[str, Any], taxonomy_fingerprint: str | None,
              start_epoch: int = 0) -> bool:
        """Open the run. ``config`` is the resolved config as plain JSON-able data.

        ``start_epoch > 0``: the training resumes after that epoch. Returns True when
        the tracker already holds epochs ``1..start_epoch`` (it continued its earlier
        run), False when they must be replayed (always False for a fresh run).
        """
        raise NotImplementedError

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Scalars of one epoch (finite numbers only; ``step`` is the epoch)."""
        raise NotImplementedError

    def log_text(self, tag: str, text: str) -> None:
        """Free text (markdown) under ``tag``."""

    def log_artifact(self, path: Path) -> None:
        """A file produced by the run (e.g. ``metrics.json`` of the best checkpoint)."""

    def finish(self, status: Status = "finished") -> None:
        """Close the run with ``status`` ('finished', 'failed' or 'killed')."""
        raise NotImplementedError


# ------------------------------------------------------------------ run ids kept in the run folder
def load_tracking_ids(run_dir: Path) -> dict[str, Any]:
    """Contents of ``run_dir/tracking.json`` (``{}`` when absent or unreadable)."""
    path = Path(run_dir) / TRACKING_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_tracking_ids(run_dir: Path, name: str, ids: dict[str, Any]) -> None:
    """Store ``ids`` as ``tracking.json[name]`` (atomic read-modify-write)."""
    data = load_tracking_ids(run_dir)
    data[name] = ids
    atomic_write_json(Path(run_dir) / TRACKING_FILE, data)


# ------------------------------------------------------------------ helpers
def config_yaml(config: Mapping[str, Any]) -> str:
    return yaml.safe_dump(_plain(config), sort_keys=False)


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


_MLFLOW_BAD_CHARS = re.compile(r"[^\w./ -]")


def mlflow_name(name: str) -> str:
    """A metric/param/tag name MLflow accepts on every platform, derived deterministically.

    ``@`` becomes ``_at_`` (``val/hdist@1`` -> ``val/hdist_at_1``); any other character
    outside letters, digits, ``_ - . /`` and space (e.g. ``:``, refused on Windows)
    becomes ``_``; empty, ``.`` and ``..`` path segments are dropped or replaced so the
    name does not change under path normalisation; at most 250 characters.
    Names that are already legal are returned unchanged.
    """
    s = _MLFLOW_BAD_CHARS.sub("_", str(name).replace("@", "_at_"))
    parts = ["__" if p == ".." else p for p in s.split("/") if p not in ("", ".")]
    s = "/".join(parts) or "_"
    if s.startswith(".."):
        s = "_" + s[1:]
    return s[:250]


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> ``{"train.lr": "0.001", ...}``; leaves as JSON text (strings as is)."""
    out: dict[str, str] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten_config(v, key + "."))
        elif isinstance(v, str):
            out[key] = v
        else:
            out[key] = json.dumps(_plain(v), default=str)
    return out


def _sqlite_uri(path: Path) -> str:
    """``sqlite:////abs/path.db`` (POSIX) or ``sqlite:///C:/path.db`` (Windows), as MLflow writes them."""
    import posixpath
    import sys
    from urllib.request import pathname2url

    url = posixpath.abspath(pathname2url(os.path.abspath(path)))
    return ("sqlite://" if sys.platform == "win32" else "sqlite:///") + url


def _finite_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _check_status(status: str) -> str:
    if status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
    return status


# ------------------------------------------------------------------ TensorBoard
@register_tracker("tensorboard")
class TensorBoardTracker(Tracker):
    """Event files in ``<run_dir>/tensorboard`` (``tensorboard --logdir runs``)."""

    def __init__(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer_cls = SummaryWriter
        self.writer: Any = None
        self.log_dir: Path | None = None

    def start(self, run_dir: Path, *, run_name: str, config: Mapping[str, Any], taxonomy_fingerprint: str | None,
              start_epoch: int = 0) -> bool:
        self.log_dir = Path(run_dir) / "tensorboard"
        continued = start_epoch > 0 and any(self.log_dir.glob("events.out.tfevents.*"))
        # purge_step: readers drop the events of steps >= start_epoch + 1 written before
        # this point, i.e. what a killed run logged after its last checkpoint (epoch
        # start_epoch itself is checkpointed and kept)
        self.writer = self._writer_cls(log_dir=str(self.log_dir), purge_step=start_epoch + 1 if continued else None)
        if not continued:
            if config:
                self.writer.add_text("config", "```\n" + config_yaml(config) + "\n```", 0)
            if taxonomy_fingerprint:
                self.writer.add_text("taxonomy", taxonomy_fingerprint, 0)
            self.writer.flush()
        return continued

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for k, v in _finite_metrics(metrics).items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def log_text(self, tag: str, text: str) -> None:
        self.writer.add_text(tag, text, 0)
        self.writer.flush()

    def finish(self, status: Status = "finished") -> None:
        _check_status(status)
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# ------------------------------------------------------------------ Weights & Biases
@register_tracker("wandb")
class WandbTracker(Tracker):
    """A Weights & Biases run (``wandb.init``); its id is kept in ``tracking.json`` for resume.

    Options: ``project`` (default ``$WANDB_PROJECT`` or ``"taxonomist"``), ``entity``,
    ``mode`` (``online``/``offline``/``disabled``; default: wandb's, i.e. ``$WANDB_MODE``
    or online), ``group``, ``tags``, ``dir`` (default: the run folder; W&B writes
    ``<dir>/wandb/``), ``settings`` (a mapping passed to ``wandb.Settings``).
    """

    def __init__(self, project: str | None = None, entity: str | None = None, mode: str | None = None,
                 group: str | None = None, tags: list[str] | None = None, dir: str | None = None,
                 settings: dict[str, Any] | None = None) -> None:
        if mode is not None and mode not in ("online", "offline", "disabled", "shared"):
            raise ConfigError(f"train.tracking_options.wandb.mode must be online, offline, disabled or shared, "
                              f"got {mode!r}")
        self.wandb = require("wandb", "wandb", "experiment tracking with Weights & Biases (train.tracking: wandb)")
        self.project, self.entity, self.mode, self.group = project, entity, mode, group
        self.tags = list(tags) if tags else None
        self.dir, self.settings = dir, dict(settings or {})
        self.run: Any = None

    def start(self, run_dir: Path, *, run_name: str, config: Mapping[str, Any], taxonomy_fingerprint: str | None,
              start_epoch: int = 0) -> bool:
        run_dir = Path(run_dir)
        project = self.project or os.environ.get("WANDB_PROJECT") or "taxonomist"
        entity = self.entity or os.environ.get("WANDB_ENTITY")
        stored = load_tracking_ids(run_dir).get("wandb") or {}
        continued = (start_epoch > 0 and bool(stored.get("id")) and stored.get("project") == project
                     and stored.get("entity") == entity)
        run_id = stored["id"] if continued else None  # None: wandb makes a new id
        wb_dir = Path(self.dir) if self.dir else run_dir
        wb_dir.mkdir(parents=True, exist_ok=True)
        cfg = dict(_plain(config))
        if taxonomy_fingerprint:
            cfg["taxonomy_fingerprint"] = taxonomy_fingerprint
        kwargs: dict[str, Any] = dict(project=project, entity=entity, name=run_name, id=run_id, dir=str(wb_dir),
                                      group=self.group, tags=self.tags, config=cfg, allow_val_change=True,
                                      resume="allow" if continued else "never")
        if self.mode is not None:
            kwargs["mode"] = self.mode
        if self.settings:
            kwargs["settings"] = self.wandb.Settings(**self.settings)
        self.run = self.wandb.init(**kwargs)
        save_tracking_ids(run_dir, "wandb", {"id": self.run.id, "project": project, "entity": entity})
        return continued

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(_finite_metrics(metrics), step=int(step))

    def log_text(self, tag: str, text: str) -> None:
        # a markdown file in the run's files (uploaded with the run)
        path = Path(self.run.dir) / "text" / f"{mlflow_name(tag).replace('/', '_')}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")

    def log_artifact(self, path: Path) -> None:
        path = Path(path).resolve()
        self.run.save(str(path), base_path=str(path.parent), policy="now")

    def finish(self, status: Status = "finished") -> None:
        _check_status(status)
        if self.run is not None:
            self.run.finish(exit_code=0 if status == "finished" else 1)
            self.run = None


# ------------------------------------------------------------------ MLflow
@register_tracker("mlflow")
class MlflowTracker(Tracker):
    """An MLflow run through ``MlflowClient`` (no global active run); its id is kept in
    ``tracking.json`` for resume.

    Options: ``tracking_uri`` (default ``$MLFLOW_TRACKING_URI``, else the SQLite store
    ``sqlite:///<output_dir>/mlflow.db`` with artifacts in ``<output_dir>/mlartifacts``,
    shared by the runs of one output folder), ``experiment`` (default ``"taxonomist"``;
    created when missing). Params are the flattened config (``train.lr``), the tag
    ``taxonomy_fingerprint`` holds the fingerprint, metric names go through
    :func:`mlflow_name`.
    """

    def __init__(self, tracking_uri: str | None = None, experiment: str = "taxonomist") -> None:
        require("mlflow", "mlflow", "experiment tracking with MLflow (train.tracking: mlflow)")
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient

        self._client_cls, self._Metric, self._Param, self._RunTag = MlflowClient, Metric, Param, RunTag
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.client: Any = None
        self.run_id: str | None = None
        self._artifact_root: str | None = None
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:"
        if uri.startswith("sqlite:"):  # mlflow-skinny has no SQL store
            for pkg in ("sqlalchemy", "alembic"):
                if importlib.util.find_spec(pkg) is None:
                    raise MissingExtraError("mlflow", "mlflow", f"MLflow's SQLite tracking store (the default; "
                                            f"{pkg!r} is missing, e.g. only mlflow-skinny is installed)")

    def resolved_uri(self, run_dir: Path) -> str:
        """The tracking URI: the option, else $MLFLOW_TRACKING_URI, else ``sqlite:///<output_dir>/mlflow.db``."""
        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri:
            self._artifact_root = None  # the server's / store's default
            return uri
        out = Path(run_dir).resolve().parent
        out.mkdir(parents=True, exist_ok=True)
        self._artifact_root = (out / "mlartifacts").as_uri()  # not MLflow's default ./mlruns in the cwd
        return _sqlite_uri(out / "mlflow.db")

    def start(self, run_dir: Path, *, run_name: str, config: Mapping[str, Any], taxonomy_fingerprint: str | None,
              start_epoch: int = 0) -> bool:
        from mlflow.exceptions import MlflowException

        run_dir = Path(run_dir)
        uri = self.resolved_uri(run_dir)
        self.client = self._client_cls(tracking_uri=uri)
        stored = load_tracking_ids(run_dir).get("mlflow") or {}
        continued = False
        if start_epoch > 0 and stored.get("run_id") and stored.get("tracking_uri") == uri:
            try:
                run = self.client.get_run(stored["run_id"])
                continued = run.info.lifecycle_stage == "active"
            except MlflowException:
                continued = False
        if continued:
            self.run_id = stored["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            existing = self.client.get_run(self.run_id).data.params
        else:
            self._close_stale(stored, uri)
            exp_id = self._experiment_id()
            tags = {"taxonomist.run_dir": str(run_dir.resolve())}
            run = self.client.create_run(exp_id, run_name=run_name, tags=tags)
            self.run_id = run.info.run_id
            existing = {}
            save_tracking_ids(run_dir, "mlflow", {"run_id": self.run_id, "experiment_id": exp_id,
                                                  "tracking_uri": uri})
        # params are immutable in MLflow: write the keys the run does not have yet
        params = {}
        for k, v in flatten_config(config).items():
            key = mlflow_name(k)
            if key not in existing and key not in params:
                params[key] = v if len(v) <= 6000 else v[:5997] + "..."
        param_list = [self._Param(k, v) for k, v in params.items()]
        for i in range(0, len(param_list), 100):
            self.client.log_batch(self.run_id, params=param_list[i:i + 100])
        if taxonomy_fingerprint:
            self.client.set_tag(self.run_id, "taxonomy_fingerprint", taxonomy_fingerprint)
        if not continued and config:
            self.client.log_text(self.run_id, config_yaml(config), "config.yaml")
        return continued

    def _close_stale(self, stored: Mapping[str, Any], uri: str) -> None:
        """A fresh start in a folder whose earlier attempt died: mark that MLflow run KILLED."""
        from mlflow.exceptions import MlflowException

        if not stored.get("run_id") or stored.get("tracking_uri") != uri:
            return
        try:
            if self.client.get_run(stored["run_id"]).info.status == "RUNNING":
                self.client.set_terminated(stored["run_id"], status="KILLED")
        except MlflowException:
            pass

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is not None:
            if exp.lifecycle_stage != "active":
                raise ConfigError(f"MLflow experiment {self.experiment!r} is deleted; restore it or set "
                                  f"train.tracking_options.mlflow.experiment to another name")
            return exp.experiment_id
        try:
            return self.client.create_experiment(self.experiment, artifact_location=self._artifact_root)
        except MlflowException:  # created meanwhile by a concurrent run
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        items = [self._Metric(mlflow_name(k), v, ts, int(step)) for k, v in _finite_metrics(metrics).items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def log_text(self, tag: str, text: str) -> None:
        self.client.log_text(self.run_id, text, f"text/{mlflow_name(tag).replace('/', '_')}.md")

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def finish(self, status: Status = "finished") -> None:
        _check_status(status)
        if self.client is not None and self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status.upper())
            self.run_id = None


__all__ = ["TRACKERS", "TRACKING_FILE", "STATUSES", "Tracker", "TensorBoardTracker", "WandbTracker", "MlflowTracker",
           "register_tracker", "list_trackers", "tracker_options", "check_tracking_config", "create_trackers",
           "require", "load_tracking_ids", "save_tracking_ids", "mlflow_name", "flatten_config", "config_yaml"]
