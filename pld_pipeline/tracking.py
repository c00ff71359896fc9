"""Experiment tracking: a run logs to TensorBoard, MLflow and/or W&B when asked (``--log``), never otherwise.

Each backend is that library's own writer, configured the way its users already configure it (MLflow:
``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME``; W&B: ``WANDB_MODE``, ``WANDB_PROJECT``, its login;
TensorBoard: event files in the run directory). A backend that fails mid-run (a tracking server down, a full
disk) prints one warning line and is dropped: tracking never fails or stalls a training run. The ids of the
tracked runs are kept in the run directory (``tracking.json``), so a resumed run continues the same tracked
run, and a sweep's runs become children of one parent run (MLflow) or one group (W&B).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import uuid
from typing import Any

from .errors import MetadataError
from .files import check_owner, read_json, write_json
from .options import require_module

log = logging.getLogger("pld_pipeline.tracking")

BACKENDS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # backend -> module it needs
IDS_FILE = "tracking.json"
DEFAULT_PROJECT = "pld"  # MLflow experiment / W&B project when the user's environment names none


def parse_log(text: str | None) -> tuple[str, ...]:
    """``"tensorboard,mlflow"`` -> the backends, checked (and their libraries present) before any work."""
    names = tuple(dict.fromkeys(n.strip().lower() for n in (text or "").split(",") if n.strip()))
    for name in names:
        if name not in BACKENDS:
            raise ValueError(f"Unknown --log backend '{name}'. Use any of: {', '.join(BACKENDS)} (comma-separated).")
        require_module(BACKENDS[name], f"--log {name}", "track")
    return names


def fingerprint_digest(fingerprint: dict[str, Any] | None) -> str | None:
    """A short, stable id of the teacher outputs a run learned from (the cache's config.json fingerprint)."""
    if fingerprint is None:
        return None
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]


def flat_params(config: dict[str, Any]) -> dict[str, str]:
    """Hyperparameters as the flat ``str -> str`` map every backend accepts (nested dicts as JSON)."""
    return {k: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list, tuple)) else str(v)
            for k, v in config.items()}


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def read_ids(folder: str, nonce: str | None = None) -> dict[str, str]:
    """The tracked-run ids kept in a run or sweep directory (a sweep's: its W&B group and MLflow parent run). Only
    the user's own file is read, and in a sweep only one that records the sweep's id (``nonce``): a planted
    tracking.json would send metrics and tags into someone else's tracked run."""
    path = os.path.join(folder, IDS_FILE)
    if not os.path.isfile(path):
        return {}
    check_owner(path)
    ids = read_json(path)
    if not isinstance(ids, dict) or not all(isinstance(v, str) for v in ids.values()):
        raise MetadataError(f"{path}: not a JSON object of run ids; remove it (tracking then starts a new run).")
    if nonce is not None and ids.get("nonce") != nonce:
        raise MetadataError(f"{path}: tracking ids this sweep did not write (its sweep.json id differs); remove it "
                            "(tracking then starts new runs).")
    return ids


def _write_ids(folder: str, ids: dict[str, str]) -> None:
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, IDS_FILE), ids)


# -- one backend each -------------------------------------------------------------------------------------
class _TensorBoard:
    name = "tensorboard"

    def __init__(self, folder: str, run_name: str, params: dict[str, str], tags: dict[str, str],
                 ids: dict[str, str], start_epoch: int, group: str | None, parent: dict[str, str]) -> None:
        from torch.utils.tensorboard import SummaryWriter
        # purge_step: events of epochs after the resumed one (written before a crash) are dropped on resume.
        self.writer = SummaryWriter(os.path.join(folder, "tensorboard"), purge_step=start_epoch or None)
        self.params = params
        if not start_epoch:
            table = "\n".join(f"| {k} | {v} |" for k, v in sorted({**params, **tags}.items()))
            self.writer.add_text("config", "| setting | value |\n|---|---|\n" + table, 0)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def finish(self, summary: dict[str, float], tags: dict[str, str], failed: bool) -> str | None:
        self.writer.add_text("result", "\n".join(f"{k}: {v}" for k, v in sorted({**summary, **tags}.items())), 0)
        hparams = {k: v for k, v in self.params.items() if len(v) < 100}
        self.writer.add_hparams(hparams, {f"hparam/{k}": v for k, v in summary.items()}, run_name=".")
        self.writer.close()
        return None


class _MLflow:
    name = "mlflow"

    def __init__(self, folder: str, run_name: str, params: dict[str, str], tags: dict[str, str],
                 ids: dict[str, str], start_epoch: int, group: str | None, parent: dict[str, str]) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient
        self.client = MlflowClient()  # MLFLOW_TRACKING_URI, as for any MLflow user
        if ids.get("mlflow"):
            self.run_id = ids["mlflow"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_PROJECT)
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        run_tags = {**tags, **({"mlflow.parentRunId": parent["mlflow"]} if parent.get("mlflow") else {})}
        self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=run_tags).info.run_id
        self.client.log_batch(self.run_id, params=[Param(k, v[:6000]) for k, v in params.items()],
                              tags=[RunTag(k, v) for k, v in run_tags.items()])

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def finish(self, summary: dict[str, float], tags: dict[str, str], failed: bool) -> str | None:
        from mlflow.entities import Metric, RunTag
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(f"final_{k}", v, now, 0) for k, v in summary.items()],
                              tags=[RunTag(k, v) for k, v in tags.items()])
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")
        return self.run_id


class _Wandb:
    name = "wandb"

    def __init__(self, folder: str, run_name: str, params: dict[str, str], tags: dict[str, str],
                 ids: dict[str, str], start_epoch: int, group: str | None, parent: dict[str, str]) -> None:
        import wandb
        self.run_id = ids.get("wandb") or uuid.uuid4().hex[:12]
        # resume="allow" with the saved id: a resumed run continues the same W&B run.
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT), name=run_name, group=group,
                              id=self.run_id, resume="allow", dir=os.environ.get("WANDB_DIR", folder),
                              config={**params, **tags}, reinit="create_new",
                              settings=wandb.Settings(silent=True, console="off"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def finish(self, summary: dict[str, float], tags: dict[str, str], failed: bool) -> str | None:
        self.run.summary.update({**{f"final_{k}": v for k, v in summary.items()}, **tags})
        self.run.finish(exit_code=1 if failed else 0)
        return self.run_id


_CLASSES = {c.name: c for c in (_TensorBoard, _MLflow, _Wandb)}


class Tracker:
    """Fans one run's parameters, per-epoch metrics and result out to the chosen backends.

    Every backend call is guarded: the first failure of a backend prints one warning line and drops it.
    """

    def __init__(self, backends: tuple[str, ...], folder: str, run_name: str, params: dict[str, Any],
                 tags: dict[str, str] | None = None, start_epoch: int = 0, group: str | None = None,
                 parent: dict[str, str] | None = None, nonce: str | None = None, reuse_ids: bool = True) -> None:
        """``nonce``: the sweep's id, recorded with the ids and required of ids read back; ``reuse_ids``: continue
        the tracked runs of ``folder``'s tracking.json (a resumed run), else start new ones."""
        self.folder = folder
        self.ids = read_ids(folder, nonce) if reuse_ids else {}
        if nonce is not None:
            self.ids["nonce"] = nonce
        self.tags = dict(tags or {})
        self.live: list[Any] = []
        flat = flat_params(params)
        for name in backends:
            backend = self._guard(name, "start", _CLASSES[name], folder, run_name, flat, self.tags, self.ids,
                                  start_epoch, group, parent or {})
            if backend is not None:
                self.live.append(backend)
                if getattr(backend, "run_id", None):
                    self.ids[name] = backend.run_id
        if self.ids:
            self._guard("tracking", "save ids", _write_ids, folder, self.ids)

    def _guard(self, name: str, what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - a tracking failure must never end a training run
            log.warning(f"tracking: {name} failed to {what} ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                        f"training goes on without it.")
            self.live = [b for b in self.live if b.name != name]
            return None

    def log_epoch(self, epoch: int, metrics: dict[str, Any]) -> None:
        values = _finite({k: v for k, v in metrics.items() if k != "epoch"})
        for backend in list(self.live):
            self._guard(backend.name, "log", backend.log, epoch, values)

    def finish(self, summary: dict[str, Any], tags: dict[str, str] | None = None, failed: bool = False) -> None:
        values, all_tags = _finite(summary), {**self.tags, **(tags or {})}
        for backend in list(self.live):
            self._guard(backend.name, "finish", backend.finish, values, {k: str(v) for k, v in all_tags.items()}, failed)
        self.live = []


def sweep_parent(backends: tuple[str, ...], sweep_dir: str, params: dict[str, Any], nonce: str) -> dict[str, str]:
    """The sweep's own tracked run (MLflow parent run; W&B group name), made once and reused on rerun.

    Returned ids go to every run of the sweep (``parent=``); kept in the sweep directory's tracking.json with the
    sweep's id (``nonce``).
    """
    ids = read_ids(sweep_dir, nonce)
    group = ids.get("group") or os.path.basename(os.path.abspath(sweep_dir))
    out = {"group": group}
    if "mlflow" in backends:
        if ids.get("mlflow"):
            out["mlflow"] = ids["mlflow"]
        else:
            tracker = Tracker(("mlflow",), sweep_dir, group, params, tags={"pld.sweep": os.path.abspath(sweep_dir)},
                              nonce=nonce)
            if tracker.ids.get("mlflow"):
                out["mlflow"] = tracker.ids["mlflow"]
    _write_ids(sweep_dir, {**ids, **out, "nonce": nonce})
    return out


def finish_sweep_parent(sweep_dir: str, best: dict[str, Any] | None, nonce: str) -> None:
    """Close the sweep's MLflow parent run with the best run found (a sweep rerun re-opens and re-closes it)."""
    ids = read_ids(sweep_dir, nonce)
    if not ids.get("mlflow"):
        return
    tracker = Tracker(("mlflow",), sweep_dir, ids.get("group", "sweep"), {}, nonce=nonce)
    summary = {"best_val_top1": best["best_val_top1"]} if best and best.get("best_val_top1") is not None else {}
    tracker.finish(summary, {"pld.best_run": best["run"]} if best else {})
