"""Experiment tracking: the tracker registry and errors, metrics.csv + TensorBoard through
MetricLogger (read back with TensorBoard's EventAccumulator), MLflow against a real file
store (read back with MlflowClient) and W&B in offline mode (read back from its run files).
Each scenario runs 3 epochs with a resume after epoch 2, the way the training loop does. Last, a tiny
real training run configured with ``train.tracking: [tensorboard, mlflow, wandb]`` checks what each
tracker received from the loop itself."""

from __future__ import annotations

import csv
import json
import struct
import sys
import warnings
from pathlib import Path

import pytest

from taxonomist.errors import ConfigError, MissingExtraError
from taxonomist.train.logger import MetricLogger
from taxonomist.train.tracking import (TensorBoardTracker, Tracker, check_tracking_config, create_trackers,
                                       flatten_config, list_trackers, load_tracking_ids, mlflow_name)

# three epochs of a real-looking run; epoch 3 is logged twice in the resume tests: once by the
# attempt that is killed before checkpointing it (KILLED_3) and once after the resume (ROWS[2])
ROWS = [
    {"epoch": 1, "lr": 0.002, "train/loss": 2.5, "val/top1_error": 0.61, "val/hdist@1": 1.8, "time_s": 3.0},
    {"epoch": 2, "lr": 0.0015, "train/loss": 1.75, "val/top1_error": 0.5, "val/hdist@1": 1.25, "time_s": 2.5},
    {"epoch": 3, "lr": 0.0005, "train/loss": 1.5, "val/top1_error": 0.375, "val/hdist@1": 1.0, "time_s": 2.75},
]
KILLED_3 = {**ROWS[2], "train/loss": 9.0, "val/hdist@1": 9.0}


@pytest.fixture(scope="module")
def run_config(plankton_dir):
    """The resolved config (plain data) and the fingerprint of the real plankton tree."""
    from taxonomist.taxonomy import load
    from taxonomist.train.config import load_config

    cfg = load_config(base={"name": "tracked", "data": {"train": str(plankton_dir / "train")},
                            "train": {"lr": 0.002, "epochs": 3}})
    return cfg.model_dump(mode="json"), load(plankton_dir / "class_paths.tsv").fingerprint


def _run_with_resume(run_dir: Path, make_trackers, config, fingerprint, *, kill_after_logging_3: bool = True):
    """Epochs 1-2, then (optionally) epoch 3 logged but never checkpointed, the process dies;
    a second logger resumes from the epoch-2 checkpoint and logs epoch 3 again."""
    first = MetricLogger(run_dir, trackers=make_trackers(), run_name="tracked", config=config,
                         taxonomy_fingerprint=fingerprint)
    first.log(dict(ROWS[0]))
    first.log(dict(ROWS[1]))
    if kill_after_logging_3:
        first.log(dict(KILLED_3))
    first.close("killed")
    history = [dict(r) for r in ROWS[:2]]  # what checkpoints/last.pt holds
    with MetricLogger(run_dir, history, start_epoch=2, trackers=make_trackers(), run_name="tracked", config=config,
                      taxonomy_fingerprint=fingerprint) as second:
        second.log(dict(ROWS[2]))
        (run_dir / "metrics.json").write_text(json.dumps({"top1_error": 0.375, "epoch": 3}))
        second.log_artifact(run_dir / "metrics.json")
    return second


# ------------------------------------------------------------------ registry and errors
def test_registered_trackers():
    assert list_trackers() == ["mlflow", "tensorboard", "wandb"]


def test_unknown_tracker_name_lists_the_registered_ones():
    with pytest.raises(ConfigError) as err:
        create_trackers(["tensorbord"])
    msg = str(err.value)
    assert "unknown tracker 'tensorbord'" in msg
    assert "mlflow, tensorboard, wandb" in msg and "Did you mean 'tensorboard'" in msg
    with pytest.raises(ConfigError, match="unknown tracker 'wnadb'"):
        create_trackers(["tensorboard"], {"wnadb": {"project": "x"}})  # a typo in tracking_options too


def test_bad_options_and_duplicates_are_config_errors():
    with pytest.raises(ConfigError, match=r"tracker 'mlflow' has no option\(s\) 'uri'; its options are: "
                                          r"experiment, tracking_uri"):
        check_tracking_config(["tensorboard"], {"mlflow": {"uri": "file:/tmp/x"}})
    with pytest.raises(ConfigError, match="lists 'tensorboard' twice"):
        check_tracking_config(["tensorboard", "tensorboard"])
    with pytest.raises(ConfigError, match="tracker 'tensorboard' has no option"):
        create_trackers(["tensorboard"], {"tensorboard": {"flush_secs": 5}})
    check_tracking_config([], {"wandb": {"project": "p", "mode": "offline"}})  # valid, nothing imported
    assert create_trackers([]) == []


@pytest.mark.parametrize("name, package", [("wandb", "wandb"), ("mlflow", "mlflow")])
def test_missing_package_names_the_extra(monkeypatch, name, package):
    monkeypatch.setitem(sys.modules, package, None)  # makes `import <package>` raise ImportError
    with pytest.raises(MissingExtraError) as err:
        create_trackers(["tensorboard", name])
    msg = str(err.value)
    assert f"needs the optional package '{package}'" in msg
    assert f"pip install 'taxonomist[{name}]'" in msg and f"pip install {package}" in msg
    assert f"train.tracking: {name}" in msg


def test_mlflow_skinny_without_sql_store_names_the_extra(monkeypatch):
    pytest.importorskip("mlflow")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "sqlalchemy" else real(n, *a))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(MissingExtraError, match=r"SQLite tracking store .*'sqlalchemy' is missing.*"
                                                r"pip install 'taxonomist\[mlflow\]'"):
        create_trackers(["mlflow"])
    # a server URI needs no SQL store
    (tracker,) = create_trackers(["mlflow"], {"mlflow": {"tracking_uri": "http://127.0.0.1:5000"}})
    assert tracker.resolved_uri(Path("runs/x")) == "http://127.0.0.1:5000"


def test_mlflow_names_are_sanitised_deterministically():
    assert mlflow_name("val/hdist@1") == "val/hdist_at_1"
    assert mlflow_name("val/top1_error") == "val/top1_error"  # legal names are unchanged
    assert mlflow_name("weight/rank:genus") == "weight/rank_genus"
    assert mlflow_name("a//b/./c/") == "a/b/c"
    assert mlflow_name("../x") == "__/x"
    assert mlflow_name("..x") == "_.x"
    assert mlflow_name("x" * 300) == "x" * 250
    assert flatten_config({"train": {"lr": 0.001, "augment": False, "mixup": None, "hidden": [512, 256],
                                     "opts": {}}, "name": "r"}) == {
        "train.lr": "0.001", "train.augment": "false", "train.mixup": "null", "train.hidden": "[512, 256]",
        "train.opts": "{}", "name": "r"}


def test_sanitised_names_pass_mlflow_validation():
    validation = pytest.importorskip("mlflow.utils.validation")
    for raw in ["val/hdist@1", "a//b/./c/", "../x", "..x", "/lead", "sp ace:colon", "tab\there", "é/ß"]:
        name = mlflow_name(raw)
        validation._validate_metric_name(name)
        validation._validate_param_name(name)
        assert not validation.path_not_unique(name)
        assert validation.validate_param_and_metric_name(name) and ":" not in name


# ------------------------------------------------------------------ metrics.csv + TensorBoard
def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _texts(log_dir: Path) -> dict[str, list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    out: dict[str, list[str]] = {}
    for tag in acc.Tags()["tensors"]:
        if tag.endswith("/text_summary"):
            out[tag.split("/")[0]] = [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag)]
    return out


def test_tensorboard_resume_drops_the_killed_epoch_and_keeps_the_checkpointed_one(tmp_path, run_config):
    config, fingerprint = run_config
    run = tmp_path / "run"
    _run_with_resume(run, lambda: [TensorBoardTracker()], config, fingerprint)
    sc = _scalars(run / "tensorboard")
    assert set(sc) == {"lr", "train/loss", "val/top1_error", "val/hdist@1", "time_s"}
    # epochs 1, 2 from the first attempt; the killed attempt's epoch 3 (9.0) is purged
    assert sc["train/loss"] == [(1, 2.5), (2, 1.75), (3, 1.5)]  # exact in float32
    assert [s for s, _ in sc["val/hdist@1"]] == [1, 2, 3]
    assert [v for _, v in sc["val/hdist@1"]] == pytest.approx([1.8, 1.25, 1.0], rel=1e-6)  # TB stores float32
    assert [s for s, _ in sc["lr"]] == [1, 2, 3] and sc["lr"][1][1] == pytest.approx(0.0015, rel=1e-6)
    texts = _texts(run / "tensorboard")
    assert texts["taxonomy"] == [fingerprint]  # written once, not again on resume
    assert len(texts["config"]) == 1 and "name: tracked" in texts["config"][0] and "lr: 0.002" in texts["config"][0]
    # metrics.csv: the history of the checkpoint plus the resumed epoch
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert [r["train/loss"] for r in rows] == ["2.5", "1.75", "1.5"]
    assert rows[0]["val/hdist@1"] == "1.8"


def test_tensorboard_added_on_resume_gets_the_history_replayed(tmp_path, run_config):
    config, fingerprint = run_config
    run = tmp_path / "run"
    first = MetricLogger(run, trackers=[])  # the first attempt had no tracker
    first.log(dict(ROWS[0]))
    first.log(dict(ROWS[1]))
    first.close()
    assert not (run / "tensorboard").exists()
    with MetricLogger(run, [dict(r) for r in ROWS[:2]], start_epoch=2, trackers=[TensorBoardTracker()],
                      config=config, taxonomy_fingerprint=fingerprint) as logger:
        logger.log(dict(ROWS[2]))
    sc = _scalars(run / "tensorboard")
    assert sc["train/loss"] == [(1, 2.5), (2, 1.75), (3, 1.5)]
    assert _texts(run / "tensorboard")["taxonomy"] == [fingerprint]


def test_old_constructor_still_writes_tensorboard_and_text(tmp_path):
    run = tmp_path / "run"
    logger = MetricLogger(run, None, start_epoch=0, tensorboard=True, write=True)
    logger.add_text("taxonomy", "sha256:abc")
    logger.log({"epoch": 1, "train/loss": 0.5, "val/x": float("nan"), "note": None})
    assert logger.writer is not None
    logger.close()
    sc = _scalars(run / "tensorboard")
    assert sc == {"train/loss": [(1, 0.5)]}  # non-finite and missing values are not sent to trackers
    assert _texts(run / "tensorboard") == {"taxonomy": ["sha256:abc"]}
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert rows == [{"epoch": "1", "train/loss": "0.5", "val/x": "nan", "note": ""}]


def test_no_tracker_and_non_writing_rank(tmp_path):
    off = MetricLogger(tmp_path / "a", tensorboard=False)
    off.log(dict(ROWS[0]))
    off.close()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["metrics.csv"]
    rank1 = MetricLogger(tmp_path / "b", write=False, trackers=[TensorBoardTracker()])
    rank1.log(dict(ROWS[0]))
    rank1.close()
    assert rank1.history == [ROWS[0]] and not (tmp_path / "b").exists()


class _Recorder(Tracker):
    registry_name = "recorder"  # not registered: the global registry stays as shipped

    def __init__(self, fail_on: str = "") -> None:
        self.calls: list[tuple] = []
        self.fail_on = fail_on

    def start(self, run_dir, *, run_name, config, taxonomy_fingerprint, start_epoch=0):
        self.calls.append(("start", run_name, taxonomy_fingerprint, start_epoch))
        if self.fail_on == "start":
            raise RuntimeError("cannot reach the server")
        return False

    def log_metrics(self, metrics, step):
        self.calls.append(("log", step, dict(metrics)))
        if self.fail_on == "log":
            raise RuntimeError("server hiccup")

    def finish(self, status="finished"):
        self.calls.append(("finish", status))


def test_statuses_failures_and_custom_trackers(tmp_path):
    ok, flaky = _Recorder(), _Recorder(fail_on="log")
    with pytest.warns(RuntimeWarning, match="tracker 'recorder': log_metrics failed .*server hiccup"):
        with MetricLogger(tmp_path / "r", trackers=[ok, flaky], run_name="n", taxonomy_fingerprint="fp") as logger:
            logger.log(dict(ROWS[0]))
    # a failing tracker does not stop the others, metrics.csv or the run
    assert ok.calls == [("start", "n", "fp", 0), ("log", 1, {k: v for k, v in ROWS[0].items() if k != "epoch"}),
                        ("finish", "finished")]
    assert flaky.calls[-1] == ("finish", "finished")
    assert (tmp_path / "r" / "metrics.csv").exists()
    # exceptions end the runs as failed / killed
    rec = _Recorder()
    with pytest.raises(ValueError), MetricLogger(tmp_path / "r2", trackers=[rec]):
        raise ValueError("boom")
    assert rec.calls[-1] == ("finish", "failed")
    rec = _Recorder()
    with pytest.raises(KeyboardInterrupt), MetricLogger(tmp_path / "r3", trackers=[rec]):
        raise KeyboardInterrupt
    assert rec.calls[-1] == ("finish", "killed")
    # a tracker that cannot start stops the run, and the ones already started are closed
    first, bad = _Recorder(), _Recorder(fail_on="start")
    with pytest.raises(RuntimeError, match="cannot reach the server"):
        MetricLogger(tmp_path / "r4", trackers=[first, bad])
    assert first.calls[-1] == ("finish", "failed")


# ------------------------------------------------------------------ MLflow (real file store)
def test_mlflow_resume_continues_the_same_run(tmp_path, run_config, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config, fingerprint = run_config
    run = tmp_path / "runs" / "tracked"
    ids = []

    def make():
        (tracker,) = create_trackers(["mlflow"], {"mlflow": {"experiment": "plankton"}})
        ids.append(load_tracking_ids(run).get("mlflow", {}).get("run_id"))
        return [tracker]

    _run_with_resume(run, make, config, fingerprint, kill_after_logging_3=False)
    stored = load_tracking_ids(run)["mlflow"]
    assert ids == [None, stored["run_id"]]  # the resume found the id of the first attempt
    uri = "sqlite:///" + str(tmp_path / "runs" / "mlflow.db")  # default: <output_dir>/mlflow.db
    assert stored["tracking_uri"] == uri and uri.startswith("sqlite:////")
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("plankton")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [stored["run_id"]]  # one run, continued
    r = runs[0]
    assert r.info.status == "FINISHED" and r.info.run_name == "tracked"
    hist = client.get_metric_history(r.info.run_id, "val/hdist_at_1")
    assert [(m.step, m.value) for m in hist] == [(1, 1.8), (2, 1.25), (3, 1.0)]
    assert [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, "train/loss")] == [
        (1, 2.5), (2, 1.75), (3, 1.5)]
    assert set(r.data.metrics) == {"lr", "train/loss", "val/top1_error", "val/hdist_at_1", "time_s"}
    p = r.data.params
    assert p["name"] == "tracked" and p["train.lr"] == "0.002" and p["train.epochs"] == "3"
    assert p["model.head.name"] == config["model"]["head"]["name"]
    assert p["data.train"] == config["data"]["train"]
    assert len(p) == len(flatten_config(config))
    assert r.data.tags["taxonomy_fingerprint"] == fingerprint
    arts = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"config.yaml", "metrics.json"} <= arts
    local = Path(client.download_artifacts(r.info.run_id, "metrics.json", str(tmp_path / "dl")))
    assert json.loads(local.read_text()) == {"top1_error": 0.375, "epoch": 3}
    # artifacts next to the store, not in the current directory
    assert exp.artifact_location == (tmp_path / "runs" / "mlartifacts").as_uri()
    assert r.info.artifact_uri.startswith(exp.artifact_location + "/")
    art_dir = tmp_path / "runs" / "mlartifacts" / r.info.artifact_uri[len(exp.artifact_location) + 1:]
    assert sorted(p.name for p in art_dir.iterdir()) == ["config.yaml", "metrics.json"]
    assert "lr: 0.002" in (art_dir / "config.yaml").read_text()


def test_mlflow_added_on_resume_and_fresh_restart(tmp_path, run_config, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    config, fingerprint = run_config
    uri = "sqlite:///" + str(tmp_path / "elsewhere.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the environment is honoured when no option is given
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root for a given URI is ./mlruns
    run = tmp_path / "runs" / "r"
    # a tracker switched on when resuming gets epochs 1-2 from the checkpoint history
    with MetricLogger(run, [dict(r) for r in ROWS[:2]], start_epoch=2, trackers=create_trackers(["mlflow"]),
                      config=config, taxonomy_fingerprint=fingerprint) as logger:
        logger.log(dict(ROWS[2]))
    client = MlflowClient(tracking_uri=uri)
    first_id = load_tracking_ids(run)["mlflow"]["run_id"]
    assert [(m.step, m.value) for m in client.get_metric_history(first_id, "train/loss")] == [
        (1, 2.5), (2, 1.75), (3, 1.5)]
    assert client.get_experiment(client.get_run(first_id).info.experiment_id).name == "taxonomist"
    assert load_tracking_ids(run)["mlflow"]["tracking_uri"] == uri and not (tmp_path / "runs" / "mlflow.db").exists()
    # a fresh start (no checkpoint) in the same folder is a new run; a stale RUNNING one is marked KILLED
    client.update_run(first_id, status="RUNNING")
    with MetricLogger(run, trackers=create_trackers(["mlflow"]), config=config) as logger:
        logger.log(dict(ROWS[0]))
    second_id = load_tracking_ids(run)["mlflow"]["run_id"]
    assert second_id != first_id
    assert client.get_run(first_id).info.status == "KILLED"
    assert client.get_run(second_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(second_id, "train/loss")] == [1]


# ------------------------------------------------------------------ Weights & Biases (offline)
def _wandb_records(path: Path):
    """Records of a W&B transaction log (.wandb: LevelDB-log framing of protobuf Records)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, header = 32768, 7
    pos, chunks = 7, b""
    while pos + header <= len(data):
        if block - pos % block < header:  # block trailer padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        payload = data[pos + header:pos + header + length]
        pos += header + length
        if kind == 0 and length == 0:
            break
        chunks += payload
        if kind in (1, 4):  # FULL or LAST
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(chunks)
            chunks = b""
            yield rec


def _wandb_offline_run(run_dir: Path) -> dict:
    """What an offline run folder holds: run id/project/name/config, history rows, files, exit code."""
    out: dict = {"history": [], "files": []}
    (log,) = run_dir.glob("run-*.wandb")
    for rec in _wandb_records(log):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.update(id=rec.run.run_id, project=rec.run.project, name=rec.run.display_name,
                       config={it.key: json.loads(it.value_json) for it in rec.run.config.update})
        elif kind == "history":
            out["history"].append({(it.key or "/".join(it.nested_key)): json.loads(it.value_json)
                                   for it in rec.history.item})
        elif kind == "files":
            out["files"].extend(f.path for f in rec.files.files)
        elif kind == "exit":
            out["exit_code"] = rec.exit.exit_code
    return out


def test_wandb_offline_resume_keeps_the_run_id(tmp_path, run_config, monkeypatch):
    wandb = pytest.importorskip("wandb")
    for var, sub in (("WANDB_DIR", "wbdir"), ("WANDB_CONFIG_DIR", "wbconfig"), ("WANDB_CACHE_DIR", "wbcache"),
                     ("WANDB_DATA_DIR", "wbdata")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    config, fingerprint = run_config
    run = tmp_path / "runs" / "tracked"
    opts = {"wandb": {"project": "taxo-tests", "mode": "offline", "settings": {"console": "off"}}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            _run_with_resume(run, lambda: create_trackers(["wandb"], opts), config, fingerprint,
                             kill_after_logging_3=False)
    finally:
        wandb.teardown()
    stored = load_tracking_ids(run)["wandb"]
    assert stored["project"] == "taxo-tests" and stored["entity"] is None and len(stored["id"]) >= 8
    # one offline folder per attempt (under the run folder), both for the same W&B run id
    first, second = [_wandb_offline_run(d) for d in sorted((run / "wandb").glob("offline-run-*"))]
    assert first["id"] == second["id"] == stored["id"]
    assert first["project"] == second["project"] == "taxo-tests" and first["name"] == "tracked"
    # history: epochs 1-2 in the first attempt, epoch 3 in the resumed one, step = epoch
    assert [(h["_step"], h["train/loss"], h["val/hdist@1"], h["lr"]) for h in first["history"]] == [
        (1, 2.5, 1.8, 0.002), (2, 1.75, 1.25, 0.0015)]
    assert [(h["_step"], h["train/loss"], h["val/hdist@1"]) for h in second["history"]] == [(3, 1.5, 1.0)]
    assert "epoch" not in second["history"][0]
    # the resolved config with the taxonomy fingerprint; the logged file; the exit codes
    cfg = second["config"]
    assert cfg["taxonomy_fingerprint"] == fingerprint
    assert cfg["train"]["lr"] == 0.002 and cfg["name"] == "tracked" and cfg["data"] == config["data"]
    assert "metrics.json" in second["files"] and "metrics.json" not in first["files"]
    (offline2,) = [d for d in (run / "wandb").glob("offline-run-*") if (d / "files" / "metrics.json").exists()]
    assert json.loads((offline2 / "files" / "metrics.json").read_text()) == {"top1_error": 0.375, "epoch": 3}
    assert (first["exit_code"], second["exit_code"]) == (1, 0)  # killed, finished


def test_wandb_rejects_a_bad_mode():
    pytest.importorskip("wandb")
    with pytest.raises(ConfigError, match="wandb.mode must be online, offline, disabled or shared"):
        create_trackers(["wandb"], {"wandb": {"mode": "offlne"}})


# ------------------------------------------------------------------ through the training config
@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory, demo) -> Path:
    """Real demo plankton images: 4 classes, 3 train and 1 val image each."""
    import pandas as pd

    out = tmp_path_factory.mktemp("tiny")
    classes = sorted(p.name for p in (demo / "train").iterdir() if p.is_dir())[:4]
    for split, n in (("train", 3), ("val", 1)):
        rows = [{"path": str(img), "label": c} for c in classes for img in sorted((demo / split / c).glob("*.jpg"))[:n]]
        pd.DataFrame(rows).to_csv(out / f"{split}.csv", index=False)
    return out


def test_train_tracking_config_feeds_tensorboard_mlflow_and_wandb(tmp_path, tiny_set, demo, monkeypatch):
    """`train.tracking: [tensorboard, mlflow, wandb]` on a tiny real run (frozen features, 2 epochs): each
    tracker has the resolved config, the taxonomy fingerprint and the metrics.csv values of every epoch."""
    pytest.importorskip("mlflow")
    wandb = pytest.importorskip("wandb")
    from mlflow.tracking import MlflowClient
    import yaml

    from taxonomist.train.config import load_config
    from taxonomist.train.loop import train
    from test_train_e2e import write_small_config

    for var, sub in (("WANDB_DIR", "wbdir"), ("WANDB_CONFIG_DIR", "wbconfig"), ("WANDB_CACHE_DIR", "wbcache"),
                     ("WANDB_DATA_DIR", "wbdata")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_PROJECT", "WANDB_ENTITY", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    options = {"mlflow": {"experiment": "tiny-plankton"},
               "wandb": {"project": "taxo-train", "dir": str(tmp_path / "wb"), "settings": {"console": "off"}}}
    path = write_small_config(tmp_path, tiny_set, demo, tmp_path / "cache", "tracked", epochs=2, batch_size=4,
                              tracking=["tensorboard", "mlflow", "wandb"], tracking_options=options)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            res = train(load_config(path), log=lambda _m: None)
    finally:
        wandb.teardown()
    run = res.run_dir
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    epoch_values = {k: [float(r[k]) for r in rows] for k in ("train/loss", "val/top1_error", "lr")}  # 6 digits
    fingerprint = json.loads((run / "bundle" / "bundle.json").read_text())["taxonomy_fingerprint"]
    from taxonomist.taxonomy import load

    assert fingerprint == load(run / "taxonomy.json").fingerprint  # the run's (restricted) tree
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["train"]["tracking"] == ["tensorboard", "mlflow", "wandb"]

    # TensorBoard: the config and fingerprint as text, every epoch's scalars at step = epoch
    sc = _scalars(run / "tensorboard")
    for key, values in epoch_values.items():
        assert [s for s, _ in sc[key]] == [1, 2]
        assert [v for _, v in sc[key]] == pytest.approx(values, rel=1e-5), key  # metrics.csv keeps 6 digits
    texts = _texts(run / "tensorboard")
    assert texts["taxonomy"] == [fingerprint]
    assert yaml.safe_load(texts["config"][0].strip("`\n")) == resolved

    # MLflow: the default store next to the run folders, params = the flattened config, the fingerprint tag
    uri = "sqlite:///" + str(tmp_path / "runs" / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    (r,) = client.search_runs([client.get_experiment_by_name("tiny-plankton").experiment_id])
    assert r.info.run_id == load_tracking_ids(run)["mlflow"]["run_id"] and r.info.status == "FINISHED"
    assert r.data.tags["taxonomy_fingerprint"] == fingerprint
    p = r.data.params
    assert p["train.epochs"] == "2" and p["train.batch_size"] == "4" and p["name"] == "tracked"
    assert p["data.train"] == resolved["data"]["train"] and p["train.tracking"] == '["tensorboard", "mlflow", "wandb"]'
    assert len(p) == len(flatten_config(resolved))
    exact = {}  # full precision, to compare with W&B
    for key, values in epoch_values.items():
        hist = client.get_metric_history(r.info.run_id, key)
        assert [m.step for m in hist] == [1, 2] and [m.value for m in hist] == pytest.approx(values, rel=1e-5), key
        exact[key] = [m.value for m in hist]
        assert [v for _, v in sc[key]] == pytest.approx(exact[key], rel=1e-7)  # TensorBoard: the same in float32

    # W&B (offline, its files under the dir option): the config with the fingerprint, one history row per epoch
    (offline,) = (tmp_path / "wb" / "wandb").glob("offline-run-*")
    wb = _wandb_offline_run(offline)
    assert wb["id"] == load_tracking_ids(run)["wandb"]["id"] and wb["project"] == "taxo-train"
    assert wb["name"] == "tracked" and wb["exit_code"] == 0
    assert wb["config"]["taxonomy_fingerprint"] == fingerprint
    assert {k: v for k, v in wb["config"].items() if k not in ("taxonomy_fingerprint", "_wandb")} == resolved
    assert [h["_step"] for h in wb["history"]] == [1, 2]
    for key, values in exact.items():
        assert [h[key] for h in wb["history"]] == values, key  # the same float64 numbers as MLflow got
