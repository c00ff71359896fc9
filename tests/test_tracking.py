"""Experiment tracking: what distill and sweep log, read back with each library's own reader."""
import glob
import json
import logging
import os
import struct

import pytest

from pld_pipeline.distill import DistillConfig, distill
from pld_pipeline.sweep import parse_grid, run_sweep
from pld_pipeline.tracking import fingerprint_digest, parse_log


@pytest.fixture
def tracking_env(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "pld-test")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    return uri


def settings(tiny_data, cache, out, **kw):
    kw = {"epochs": 2, **kw}
    return DistillConfig(data=tiny_data["train"].pattern, val_data=tiny_data["val"].pattern, cache=cache, out=str(out),
                         student="cifar_resnet8", batch_size=8, workers=0, device="cpu", **kw)


def wandb_records(run_dir):
    """W&B's offline run files (run-*.wandb: a LevelDB-style log of wandb's own protobuf Records), read back."""
    from wandb.proto import wandb_internal_pb2 as pb
    records = []
    for path in sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))):
        raw, pos, buf = open(path, "rb").read(), 7, b""  # 7: the ":W&B" magic, format and version header
        while pos + 7 <= len(raw):
            if 32768 - pos % 32768 < 7:  # block trailer
                pos += 32768 - pos % 32768
                continue
            _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
            buf, pos = buf + raw[pos + 7:pos + 7 + length], pos + 7 + length
            if kind in (1, 4):  # a full record, or the last fragment of one
                rec = pb.Record()
                rec.ParseFromString(buf)
                records.append(rec)
                buf = b""
            elif kind == 0:
                buf = b""
    return records


def wandb_history(run_dir):
    rows = {}
    for rec in wandb_records(run_dir):
        if rec.WhichOneof("record_type") == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            rows.setdefault(row.get("_step", rec.history.step.num), {}).update(row)
    return rows


@pytest.mark.slow
def test_distill_logs_to_tensorboard_mlflow_and_wandb_and_a_resume_continues_the_same_runs(
        tiny_data, cache, tmp_path, tracking_env):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    cfg = settings(tiny_data, cache, out, log="tensorboard,mlflow,wandb", lr=3e-3)

    def crash(event):
        if event["event"] == "epoch_end" and event["epoch"] == 0:
            raise KeyboardInterrupt  # after the first epoch's state is saved
    with pytest.raises(KeyboardInterrupt):
        distill(cfg, progress=crash)
    ids = json.load(open(out / "tracking.json"))
    client = MlflowClient(tracking_env)
    assert client.get_run(ids["mlflow"]).info.status == "FAILED"
    summary = distill(DistillConfig(**{**cfg.__dict__, "resume": True}))
    assert json.load(open(out / "tracking.json")) == ids  # the same tracked runs, continued

    run = client.get_run(ids["mlflow"])
    fingerprint = json.load(open(out / "config.json"))["cache"]
    assert run.info.status == "FINISHED" and run.data.params["lr"] == "0.003" and run.data.params["loss"] == "pld"
    assert run.data.tags["pld.cache_fingerprint"] == fingerprint_digest(fingerprint)
    assert run.data.tags["pld.cache_url"] == cache
    assert run.data.tags["pld.checkpoint"] == str(out / "best.safetensors")
    history = client.get_metric_history(ids["mlflow"], "val_top1")
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [(m.step, m.value) for m in history] == [(r["epoch"], r["val_top1"]) for r in metrics]
    assert run.data.metrics["final_best_val_top1"] == summary["best_val_top1"]

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    assert [(e.step, round(e.value, 4)) for e in acc.Scalars("val_top1")] == \
        [(r["epoch"], round(r["val_top1"], 4)) for r in metrics]  # epoch 0 once: purged and rewritten on resume
    config_text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| lr | 0.003 |" in config_text and fingerprint_digest(fingerprint) in config_text

    wb = wandb_history(str(out))
    assert sorted(wb) == [0, 1] and [wb[r["epoch"]]["val_top1"] for r in metrics] == \
        pytest.approx([r["val_top1"] for r in metrics])
    config = {i.key: json.loads(i.value_json) for rec in wandb_records(str(out))
              if rec.WhichOneof("record_type") == "run" for i in rec.run.config.update}
    assert config["lr"] == "0.003" and config["pld.cache_fingerprint"] == fingerprint_digest(fingerprint)
    summaries = {i.key: i.value_json for rec in wandb_records(str(out)) if rec.WhichOneof("record_type") == "summary"
                 for i in rec.summary.update}
    assert json.loads(summaries["pld.checkpoint"]) == str(out / "best.safetensors")


def test_nothing_is_logged_unless_asked_and_unknown_backends_are_refused(tiny_data, cache, tmp_path, tracking_env):
    distill(settings(tiny_data, cache, tmp_path / "run", epochs=1))
    assert not (tmp_path / "run" / "tracking.json").exists() and not (tmp_path / "run" / "tensorboard").exists()
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "run" / "wandb").exists()
    with pytest.raises(ValueError, match="Unknown --log backend 'neptune'"):
        parse_log("mlflow,neptune")


def test_a_tracking_server_that_is_down_only_warns(tiny_data, cache, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with caplog.at_level(logging.WARNING, logger="pld_pipeline.tracking"):
        summary = distill(settings(tiny_data, cache, tmp_path / "run", epochs=1, log="mlflow,tensorboard"))
    assert summary["best_val_top1"] is not None and (tmp_path / "run" / "summary.json").is_file()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and warnings[0].startswith("tracking: mlflow failed to start")
    assert "\n" not in warnings[0] and "training goes on without it" in warnings[0]
    assert glob.glob(str(tmp_path / "run" / "tensorboard" / "events.*"))  # the other backend still logged


def constant_classifier(path, cls):
    """A cifar_resnet8 that predicts class ``cls`` for every input (zero classifier weights, its bias alone):
    with lr 0 its validation top-1 is the share of ``cls`` in the validation set, known before training."""
    import torch
    from safetensors.torch import save_file

    from pld_pipeline.models import load_model
    torch.manual_seed(0)
    model = load_model("cifar_resnet8", num_classes=10)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["linear.weight"].zero_()
    state["linear.bias"].copy_(torch.arange(10.0) - 10.0)
    state["linear.bias"][cls] = 5.0
    save_file(state, str(path))
    return str(path)


@pytest.mark.slow
def test_a_sweep_is_one_mlflow_parent_run_with_a_child_per_configuration(tiny_data, cache, tmp_path, tracking_env):
    """Two runs whose accuracies differ by construction (constant classifiers of a frequent and a rare validation
    class): the parent run names the better one best, with its top-1."""
    from collections import Counter

    from mlflow.tracking import MlflowClient

    from pld_pipeline.data import iter_shard
    counts = Counter(int(s["cls"]) for u in tiny_data["val"].shards for s in iter_shard(u)).most_common()
    (common, n_common), (rare, n_rare) = counts[0], counts[-1]
    assert n_common > n_rare
    n_val = sum(n for _, n in counts)
    checkpoints = [constant_classifier(tmp_path / "rare.safetensors", rare),  # the worse one first
                   constant_classifier(tmp_path / "common.safetensors", common)]
    base = {"data": tiny_data["train"].pattern, "val_data": tiny_data["val"].pattern, "cache": cache,
            "student": "cifar_resnet8", "loss": "ce", "lr": 0.0, "epochs": 1, "batch_size": 8, "workers": 0,
            "device": "cpu", "log": "mlflow,wandb"}
    rows = run_sweep(base, {"init_checkpoint": checkpoints}, [], str(tmp_path / "sw"))
    names = [r["run"] for r in rows]
    assert [r["best_val_top1"] for r in rows] == pytest.approx([100 * n_rare / n_val, 100 * n_common / n_val])
    parent_id = json.load(open(tmp_path / "sw" / "tracking.json"))["mlflow"]
    client = MlflowClient(tracking_env)
    parent = client.get_run(parent_id)
    experiment = client.get_experiment_by_name("pld-test").experiment_id
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(c.info.run_name for c in children) == sorted(names)
    assert {c.data.params["init_checkpoint"] for c in children} == set(checkpoints)
    assert parent.info.status == "FINISHED" and json.loads(parent.data.params["grid.init_checkpoint"]) == checkpoints
    assert parent.data.tags["pld.best_run"] == names[1]  # the common class's run: the maximum, not the first
    assert parent.data.metrics["final_best_val_top1"] == pytest.approx(100 * n_common / n_val)
    groups = {rec.run.run_group for name in names for rec in wandb_records(str(tmp_path / "sw" / name))
              if rec.WhichOneof("record_type") == "run"}
    assert groups == {"sw"}  # W&B: one group per sweep


def test_epochs_not_evaluated_send_no_nan_metrics_to_the_trackers(tiny_data, tmp_path, monkeypatch):
    """--eval-every 2 over 3 epochs: epoch 0 is not evaluated. Its row in metrics.jsonl holds NaN val_* (a CSV
    needs every column), but a tracker must get only what was measured: NaN points break MLflow's and W&B's
    charts and best-value summaries."""
    import math

    from pld_pipeline import tracking
    logged = {}

    class Recorder:
        name, run_id = "tensorboard", None

        def __init__(self, *args):
            pass

        def log(self, step, metrics):
            logged[step] = metrics

        def finish(self, summary, tags, failed):
            logged["final"] = summary

    monkeypatch.setitem(tracking._CLASSES, "tensorboard", Recorder)
    distill(DistillConfig(data=tiny_data["train"].shards[-1], val_data=tiny_data["val"].pattern, out=str(tmp_path / "r"),
                          student="cifar_resnet8", loss="ce", epochs=3, eval_every=2, batch_size=8, workers=0,
                          device="cpu", num_classes=10, recipe={"name": "cifar", "size": 16, "pad": 2},
                          log="tensorboard"))
    assert sorted(k for k in logged if k != "final") == [0, 1, 2]
    assert all(math.isfinite(v) for metrics in logged.values() for v in metrics.values()), logged
    assert "train_loss" in logged[0] and not any(k.startswith("val_") for k in logged[0])
    assert all("val_top1" in logged[e] for e in (1, 2))  # the evaluated epochs (the 2nd and the last)
