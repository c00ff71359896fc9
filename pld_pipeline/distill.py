"""Stage 2: train a student from the cache, with no teacher anywhere.

config -> setup (torchrun, device, seeds) -> data (cache blocks joined by key) -> student (scratch / init /
resume) -> timm optimizer + cosine schedule -> loop -> eval each epoch -> checkpoints and metrics. Resuming
restarts at the last finished epoch; every epoch's data order depends only on (seed, epoch), so a resumed run
ends with the same weights as an uninterrupted one.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import pickle
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from . import distributed as D
from .data import expand_shards, worker_errors
from .faults import kill_point
from .errors import MetadataError, PldError
from .files import STATE_FILE, SUMMARY_FILE, json_field, read_json, write_bytes, write_json, write_text
from .halving import Halving
from .class_map import map_targets
from .losses import LOSSES, TeacherTargets, create_loss, get_loss
from .models import load_model, output_width, preprocessing_of, require_teacher_input, student_preprocessing
from .shards import read_classes
from .student_data import VIEW_POLICIES, Batch, EvalSamples, StudentData
from .sweep import check_own_run, sweep_nonce
from .tracking import Tracker, fingerprint_digest, parse_log, read_ids
from .views import ViewRecipe, normalize

ProgressFn = Callable[[dict[str, Any]], None]


@dataclass
class DistillConfig:
    data: str
    out: str
    student: str
    loss: str = "pld"
    cache: str | None = None
    cache_dir: str | None = None  # local block cache for a remote (s3://, gs://, http://) cache
    expect_digest: str | None = None  # the cache's published digest (sha256:HEX): any other cache is refused
    val_data: str | None = None
    teacher: str | None = None  # which cached teacher (needed when the cache holds several)
    temperature: float | None = None  # default: the loss's (pld 1, kd 2, dist 1)
    alpha: float | None = None  # kd/dist: weight of the true-label cross-entropy (default 0.1)
    beta: float | None = None  # dist: inter-class weight (default 0.45)
    gamma: float | None = None  # dist: intra-class weight (default 0.45)
    mixed_first: str | None = None  # pld on mixed views: dominant (default) or teacher (losses.MIXED_FIRST)
    view_policy: str = "rotate"
    top_k: int | None = None  # use only the first k cached classes (what a top-k cache would hold)
    class_map: str | None = None  # JSON file: the student's classes as groups of the cached teacher's (class_map.py)
    labels: str | None = None  # under a class map: the shards' labels are teacher or student classes (None: decide)
    eval_every: int = 1
    epochs: int = 10
    batch_size: int = 128
    opt: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    min_lr: float = 1e-6
    clip_grad: float | None = None
    ema_decay: float | None = None
    channels_last: bool = True
    amp: bool = True  # bf16 autocast on CUDA (CPU runs in float32)
    seed: int = 0
    workers: int | None = None  # DataLoader workers; None: 2 on CPU, up to 8 per GPU (distributed.loader_workers)
    device: str = "auto"
    deterministic: bool = False  # deterministic kernels only (bit-identical resume on CUDA; slower)
    init_checkpoint: str | None = None
    student_size: int | None = None  # train and evaluate the student at this resolution (views resized to it)
    pretrained: bool = False  # start the student from its timm hub weights
    num_classes: int | None = None  # only without a cache
    recipe: dict[str, Any] = field(default_factory=lambda: {"name": "cifar", "size": 32})  # only without a cache
    shuffle_buffer: int = 1000
    image_field: str | None = None  # None: the cache's (recorded in its view recipe), else jpg;jpeg;png;webp
    label_field: str = "cls"
    resume: bool = False
    # Baseline only: a teacher run on every step (fresh views each epoch), to compare against the cache.
    online_teacher: str | None = None
    online_teacher_checkpoint: str | None = None
    online_teacher_pretrained: bool = False
    log: str | None = None  # experiment tracking: any of tensorboard,mlflow,wandb (tracking.BACKENDS)
    sweep: str | None = None  # the sweep directory this run belongs to: its tracking parent and halving study

    def loss_params(self) -> dict[str, float]:
        """The loss parameters the user set; create_loss refuses those the loss does not take."""
        names = {n for entry in LOSSES.values() for n in entry.params}
        return {n: getattr(self, n) for n in sorted(names) if getattr(self, n, None) is not None}


# -- setup ------------------------------------------------------------------------------------------
_MAY_CHANGE_ON_RESUME = ("resume", "workers", "device", "deterministic", "log", "sweep", "expect_digest")


def _same_setting(key: str, saved: Any, now: Any) -> bool:
    """Equal settings; recipes by meaning (`{"pad": 4}` spelt out by the command line, or left to its default)."""
    if key == "recipe" and isinstance(saved, dict) and isinstance(now, dict):
        return recipe_of(saved) == recipe_of(now)
    return saved == now


def _check_same_class_map(cfg: DistillConfig, data: StudentData) -> None:
    """A resumed run keeps its class map: the same path (checked with the settings) must still give the same groups
    (a map file edited between the runs would change the student's classes mid-run)."""
    config_path = os.path.join(cfg.out, "config.json")
    cache = read_json(config_path).get("cache")
    saved = cache.get("class_map") if isinstance(cache, dict) else None
    saved_sha = saved.get("sha256") if isinstance(saved, dict) else None
    now = data.class_map.to_dict()["sha256"] if data.class_map else None
    if saved_sha != now:
        raise ValueError(f"--resume: --class-map {cfg.class_map} now maps other classes than {cfg.out} was trained "
                         "with (its config.json); resume with the map it used, or use another --out.")


def recipe_of(overrides: dict[str, Any]) -> ViewRecipe:
    """The recipe a run without a cache uses: the defaults with ``DistillConfig.recipe`` on top."""
    return ViewRecipe.from_dict({**ViewRecipe().to_dict(), **overrides})


def _check_run_dir(cfg: DistillConfig, world_size: int) -> str | None:
    """The state file to resume from, or None for a fresh run; refuses to silently clobber another run, a resume
    on another number of processes (its schedule, steps per epoch and data split were sized for the old one), and
    in a sweep a run folder that sweep did not start (sweep.check_own_run)."""
    state_path = os.path.join(cfg.out, STATE_FILE)
    links = sorted(n for n in os.listdir(cfg.out) if os.path.islink(os.path.join(cfg.out, n))) if os.path.isdir(cfg.out) else []
    if links:  # a link planted in a (shared) run folder would send the run's writes elsewhere
        raise ValueError(f"--out {cfg.out} holds symbolic links ({', '.join(links[:5])}); pld does not write through "
                         "links in a run folder: remove them, or choose another --out.")
    if cfg.resume:
        if not os.path.isfile(state_path):
            raise ValueError(f"--resume: no {STATE_FILE} in {cfg.out}; start without --resume.")
        config_path = os.path.join(cfg.out, "config.json")
        run_config = read_json(config_path)
        saved = json_field(run_config, config_path, "config", kind=dict)
        if run_config.get("world_size", 1) != world_size:
            raise ValueError(f"--resume on {world_size} process(es), but {cfg.out} was trained on "
                             f"{run_config.get('world_size', 1)}: resume with the same torchrun --nproc_per_node.")
        mine = {k: v for k, v in asdict(cfg).items() if k not in _MAY_CHANGE_ON_RESUME}
        diff = sorted(k for k, v in mine.items() if not _same_setting(k, saved.get(k), v))
        if diff:
            raise ValueError(f"--resume with different settings ({', '.join(diff)}) than {cfg.out}/config.json; "
                             "resume with the same command, or use another --out.")
        if cfg.sweep:
            check_own_run(cfg.sweep, cfg.out)
        return state_path
    if os.path.isfile(state_path):
        raise ValueError(f"{cfg.out} already holds a run; pass --resume to continue it or choose another --out.")
    _check_foreign_files(cfg.out)
    return None


def _load_state(path: str, model: torch.nn.Module) -> Any:
    """``last_state.pt``, size-checked against what this model's run writes (optimizer moments and EMA: a few
    copies of the weights) before ``torch.load`` reads a byte: a planted file could be a sparse terabyte."""
    limit = STATE_COPIES * sum(t.numel() * t.element_size() for t in model.state_dict().values()) + (64 << 20)
    size = os.stat(path).st_size
    if size > limit:
        raise MetadataError(f"{path}: {size:,} bytes, more than the {limit:,} this run's state can hold (edited?); "
                            "start the run again in a new --out.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise MetadataError(f"{path}: not a run state pld can load safely ({type(e).__name__}); start the "
                            "run again in a new --out.") from None


#: Copies of the weights a run state may hold: optimizer moments (two for Adam-like optimizers), EMA, and slack
STATE_COPIES = 4


def _resume_from(state_path: str, cfg: DistillConfig, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                 ema: Any, device: torch.device) -> tuple[int, dict[str, Any], list[dict[str, Any]]]:
    """Load a run's saved state into the freshly built model, optimizer, scheduler and EMA, after checking it is
    what this run writes: a run folder may come from someone else, and ``last_state.pt`` is only
    ``weights_only``-safe, not honest. Everything the run's own settings determine (the schedule, each
    optimizer hyper-parameter but the scheduled lr) must equal what those settings give; the epoch and history
    must agree; state tensors must have their parameters' shapes. Returns (start epoch, best, history)."""
    path = state_path
    state = _load_state(path, model)

    def refuse(what: str) -> MetadataError:
        return MetadataError(f"{path}: {what}, not what pld writes for this run (edited?); start the run again in "
                             "a new --out.")
    if not isinstance(state, dict) or not {"optimizer", "scheduler", "ema", "epoch", "best", "history"} <= set(state):
        raise refuse("not a run state")
    epoch, best, history = state["epoch"], state["best"], state["history"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch < cfg.epochs:
        raise refuse(f"last finished epoch {repr(epoch)[:24]} outside [0, {cfg.epochs})")
    if epoch == cfg.epochs - 1 and not os.path.isfile(os.path.join(cfg.out, SUMMARY_FILE)):
        raise refuse("a state at the last epoch without the run's summary.json (it would finish untrained)")
    if not (isinstance(history, list) and len(history) == epoch + 1 and all(isinstance(r, dict) for r in history)):
        raise refuse(f"a history that is not {epoch + 1} epoch records")
    if not (isinstance(best, dict) and isinstance(best.get("val_top1"), (int, float))
            and isinstance(best.get("epoch"), int) and -1 <= best["epoch"] <= epoch):
        raise refuse("a best-epoch record that is not one")
    if state["scheduler"] != scheduler.state_dict():
        raise refuse("a learning-rate schedule other than this run's settings give")
    fresh = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in optimizer.state_dict()["param_groups"]]
    saved = state["optimizer"]
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(groups, list) or [{k: v for k, v in g.items() if k not in ("params", "lr")}
                                        for g in groups if isinstance(g, dict)] != fresh:
        raise refuse("optimizer settings other than this run's")
    shapes = {i: p.shape for i, p in enumerate(q for g in optimizer.param_groups for q in g["params"])}
    per_param = saved.get("state")
    if not isinstance(per_param, dict) or any(
            i not in shapes or not isinstance(v, dict) or any(
                isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape != shapes[i] for t in v.values())
            for i, v in per_param.items()):
        raise refuse("optimizer state that does not fit the model")
    try:
        model.load_state_dict(load_file(os.path.join(cfg.out, "last.safetensors"), device=str(device)))
        optimizer.load_state_dict(saved)
        if ema is not None:
            ema.load_state_dict(state["ema"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise refuse(f"weights or state that do not load ({' '.join(str(e).split())[:200]})") from None
    return epoch + 1, best, history


#: What a run writes into its folder (tracking.json: tracking.py, halving.json: halving.py; tensorboard/ and
#: wandb/ are the trackers' own folders); a fresh run may rewrite these, and nothing else.
RUN_FILES = frozenset({"config.json", "metrics.jsonl", "metrics.csv", "best.safetensors", "best.json",
                       "last.safetensors", "last.json", STATE_FILE, SUMMARY_FILE, "tracking.json", "halving.json",
                       "tensorboard", "wandb"})


def _check_foreign_files(out: str) -> None:
    """A fresh run writes into ``out`` only if it is new, empty, or a run folder that pld started (its first
    file, config.json, is pld's): never over files the user put there."""
    if not os.path.isdir(out):
        return
    names = sorted(os.listdir(out))
    foreign = [n for n in names if n not in RUN_FILES and not n.endswith(".tmp")]
    config_path = os.path.join(out, "config.json")
    if not foreign and names and not os.path.islink(config_path) and os.path.isfile(config_path):
        try:
            doc = read_json(config_path)
        except MetadataError:
            doc = None
        if not (isinstance(doc, dict) and isinstance(doc.get("config"), dict) and "student" in doc["config"]):
            foreign = ["config.json (not a pld run's)"]
    elif names and not foreign:
        foreign = [n for n in names if n != "config.json"] or names  # pld writes config.json before anything else
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise ValueError(f"--out {out} holds files pld did not write ({shown}); a run writes only into a new or "
                         "empty folder (or its own, with --resume): choose another --out.")


# -- one epoch --------------------------------------------------------------------------------------
class NonFiniteLoss(PldError):
    """A step's loss was NaN or infinite: the run stops before anything it trained is saved."""


class LossGuard:
    """Stops a run within one step of a non-finite loss, naming the epoch, the step and, where the batch came
    from the cache, its units. On a CPU a step is checked before its update; on a GPU step n's flag is copied
    without blocking and read at step n+1 (or at the epoch's end, before its checkpoints), so training never
    waits for the device."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.pending = device, None

    def step(self, epoch: int, step: int, loss: torch.Tensor, logits: torch.Tensor,
             targets: TeacherTargets | None, source: torch.Tensor | None) -> None:
        flag, event = torch.isfinite(loss.detach()), None
        if self.device.type == "cuda":  # into page-locked memory: a copy that does not wait for the device
            flag = torch.empty((), dtype=torch.bool, pin_memory=True).copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        previous = self.pending
        self.pending = (epoch, step, flag, event, loss.detach(), logits.detach(), targets, source)
        if previous is not None:
            self._check(*previous)
        if event is None:
            self.flush()

    def flush(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self._check(*pending)

    @staticmethod
    def _check(epoch: int, step: int, flag: torch.Tensor, event: Any, loss: torch.Tensor, logits: torch.Tensor,
               targets: TeacherTargets | None, source: torch.Tensor | None) -> None:
        if event is not None:
            event.synchronize()
        if bool(flag):
            return
        rows = None
        if targets is not None:  # which samples' cached values are not finite (a cache edited and re-signed)
            ok = (torch.isfinite(targets.topk_logp).all(1) & torch.isfinite(targets.label_logp)
                  & torch.isfinite(targets.logz))
            rows = (~ok).nonzero().flatten().cpu() if not bool(ok.all()) else None
        if rows is not None:
            why, fix = "the teacher targets of some samples are not finite", ("the cache is damaged or was edited: "
                                                                               "run `pld verify` on it")
        elif not bool(torch.isfinite(logits).all()):
            why, fix = "the student's outputs overflowed (training diverged)", "lower --lr or set --clip-grad"
        else:
            why, fix = "the loss overflowed", "lower --lr or set --clip-grad"
        units = ""
        if source is not None:
            pairs = sorted({(int(s), int(v)) for s, v in (source if rows is None else source[rows]).tolist()})
            units = "; batch from cache " + ", ".join(f"s{s:06d} view {v}" for s, v in pairs[:6]) + (
                f" and {len(pairs) - 6} more" if len(pairs) > 6 else "")
        raise NonFiniteLoss(f"Non-finite loss ({float(loss):g}) at epoch {epoch}, step {step}: {why}{units}. Stopped "
                            f"before saving this epoch; {fix}.")



@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, prep: dict[str, Any], device: torch.device,
             dist: D.DistInfo, channels_last: bool, autocast: Any) -> dict[str, float]:
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1, top-5, count: no sync per batch
    for batch in worker_errors(loader):
        x = batch["image"].to(device, non_blocking=True)
        y = batch["label"].to(device, non_blocking=True).long()
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = model(normalize(x, prep["mean"], prep["std"])).float()
        topk = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums += torch.stack([F.cross_entropy(logits, y, reduction="sum"), (topk[:, 0] == y).sum(),
                             (topk == y[:, None]).any(1).sum(), torch.tensor(len(y), device=device)]).double()
    loss_sum, top1, top5, count = D.all_reduce_sum(sums.tolist(), dist, device)
    n = max(count, 1.0)
    return {"val_loss": loss_sum / n, "val_top1": 100 * top1 / n, "val_top5": 100 * top5 / n, "val_samples": int(count)}


def _write_metrics(out: str, history: list[dict[str, Any]]) -> None:
    write_text(os.path.join(out, "metrics.jsonl"), "".join(json.dumps(row) + "\n" for row in history))
    keys = list(dict.fromkeys(k for row in history for k in row))
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(history)
    write_text(os.path.join(out, "metrics.csv"), buf.getvalue())


def _save_weights(model: torch.nn.Module, path: str, meta: dict[str, Any]) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # serialised in memory, written by files.write_bytes: atomic, never through a link, a full disk named
    write_bytes(path, save(state, metadata={"pld": json.dumps(meta)[:60000]}))
    write_json(os.path.splitext(path)[0] + ".json", meta)  # the file's own suffix, not one in a folder name


def distill(cfg: DistillConfig, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Train ``cfg.student`` on ``cfg.data`` with ``cfg.loss`` from the cache. Returns the final summary."""
    if cfg.view_policy not in VIEW_POLICIES:
        raise ValueError(f"Unsupported view policy '{cfg.view_policy}'. Use one of: {', '.join(VIEW_POLICIES)}.")
    needs_teacher = get_loss(cfg.loss).needs_teacher
    loss_fn = create_loss(cfg.loss, **cfg.loss_params())  # checks the name and parameters before any work
    parse_log(cfg.log)
    # --online-teacher with --cache: the cache supplies the views only (its stored, possibly mixed, views replayed),
    # the teacher runs on them every step: the baseline that shows what the cached targets are worth.
    if needs_teacher and not (cfg.cache or cfg.online_teacher):
        raise ValueError(f"--loss {cfg.loss} needs --cache (teacher targets); only --loss ce trains without one.")
    if cfg.expect_digest is not None and not cfg.cache:
        raise ValueError("--expect-digest pins a teacher cache; give the cache with --cache.")
    if cfg.student_size is not None and cfg.student_size < 1:
        raise ValueError(f"--student-size must be >= 1 pixel, got {cfg.student_size}.")
    if cfg.temperature is not None and not cfg.temperature > 0:
        raise ValueError(f"--temperature must be positive, got {cfg.temperature:g}.")
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise ValueError(f"--out {cfg.out} is an existing file; a run directory is a folder: choose another --out.")
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.eval_every < 1:
        raise ValueError(f"--epochs, --batch-size and --eval-every must be >= 1, got {cfg.epochs}, {cfg.batch_size} "
                         f"and {cfg.eval_every}.")
    emit = progress or (lambda event: None)
    device = D.resolve_device(cfg.device, D.env_int("LOCAL_RANK", 0))
    D.configure_backends(device, cfg.deterministic)
    cfg = replace(cfg, workers=D.loader_workers(cfg.workers, device))
    dist = D.init_distributed(device)
    try:
        return _run(cfg, device, dist, needs_teacher, loss_fn, emit)
    finally:
        D.cleanup(dist)


def _run(cfg: DistillConfig, device: torch.device, dist: D.DistInfo, needs_teacher: bool,
         loss_fn: Callable[..., torch.Tensor], emit: ProgressFn) -> dict[str, Any]:
    t_run = time.perf_counter()
    state = _check_run_dir(cfg, dist.world_size)
    temperature = get_loss(cfg.loss).temperature if cfg.temperature is None else cfg.temperature
    data = _train_data(cfg, temperature, needs_teacher, device, dist)
    if state is not None:
        _check_same_class_map(cfg, data)
    targets_for = _targets_source(cfg, data, temperature, needs_teacher, device)
    model, prep = _student(cfg, data.num_classes, device)
    optimizer, scheduler = _optimizer(cfg, model, len(data))
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay else None
    start_epoch, best, history = 0, {"val_top1": -1.0, "epoch": -1}, []
    if state is not None:
        start_epoch, best, history = _resume_from(state, cfg, model, optimizer, scheduler, ema, device)
    train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if dist.enabled else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and cfg.amp else nullcontext()
    val_loader = _val_loader(cfg, data, device, dist)
    steps_per_epoch = len(data)
    if dist.is_main:
        _write_run_config(cfg, data, temperature if needs_teacher else None, prep, dist.world_size)
    params = sum(p.numel() for p in model.parameters())
    tracker = _tracker(cfg, data, temperature if needs_teacher else None, start_epoch) if dist.is_main and cfg.log else None
    halving = Halving.for_run(cfg.sweep, cfg.out, history) if dist.is_main else None
    stopped: dict[str, Any] = {}
    guard = LossGuard(device)
    emit({"event": "train_start", "loss": cfg.loss, "student": cfg.student, "params": params, "epochs": cfg.epochs,
          "device": str(device), "world_size": dist.world_size, "resumed_epoch": start_epoch or None})

    try:
        for epoch in range(start_epoch, cfg.epochs):
            torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout/drop-path: a function of (seed, epoch) alone
            emit({"event": "epoch_start", "epoch": epoch, "steps": steps_per_epoch})
            train_model.train()
            t0, seen, loss_sum = time.perf_counter(), 0, torch.zeros((), device=device)
            for step, batch in enumerate(data.epoch(epoch)):
                kill_point("distill.step")
                x = batch.images.to(device, non_blocking=True)
                y = batch.labels.to(device, non_blocking=True)
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                targets = targets_for(batch, x, y)
                mix = None if batch.mix is None else batch.mix.to(device, non_blocking=True)
                with autocast:
                    logits = train_model(normalize(x, prep["mean"], prep["std"]))
                loss = loss_fn(logits.float(), y, targets, mix)
                guard.step(epoch, step, loss, logits, targets, batch.source)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip_grad:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                optimizer.step()
                scheduler.step_update(epoch * steps_per_epoch + step + 1)
                if ema is not None:
                    ema.update(model, step=epoch * steps_per_epoch + step)
                loss_sum += loss.detach()
                seen += len(y)
                if step % 10 == 0 or step + 1 == steps_per_epoch:
                    # .item() is a device sync: only every few steps, for the progress bar.
                    emit({"event": "step", "epoch": epoch, "step": step, "loss": float(loss.detach()),
                          "samples_per_s": seen * dist.world_size / max(time.perf_counter() - t0, 1e-9),
                          "lr": optimizer.param_groups[0]["lr"]})
            guard.flush()  # before this epoch's checkpoints are written
            if seen < steps_per_epoch * cfg.batch_size:
                raise RuntimeError(f"Epoch {epoch} produced {seen} samples, expected {steps_per_epoch * cfg.batch_size}; "
                                   "were samples skipped at cache time? Lower --batch-size.")
            train_seconds = time.perf_counter() - t0
            row: dict[str, Any] = {"epoch": epoch, "train_loss": float(loss_sum) / steps_per_epoch,
                                   "lr": optimizer.param_groups[0]["lr"], "epoch_seconds": train_seconds,
                                   "samples_per_s": seen * dist.world_size / max(train_seconds, 1e-9)}
            if val_loader is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
                row.update(evaluate(model, val_loader, prep, device, dist, cfg.channels_last, autocast))
                if ema is not None:
                    ema_metrics = evaluate(ema.module, val_loader, prep, device, dist, cfg.channels_last, autocast)
                    row.update({f"ema_{k}": v for k, v in ema_metrics.items() if k != "val_samples"})
            else:
                row.update({"val_loss": math.nan, "val_top1": math.nan, "val_top5": math.nan})
            history.append(row)
            if dist.is_main:
                meta = {"epoch": epoch, "metrics": row, "student": cfg.student, "num_classes": data.num_classes,
                        "loss": cfg.loss}
                improved = val_loader is not None and row["val_top1"] > best["val_top1"]  # NaN (not evaluated) never wins
                if improved or val_loader is None:
                    best = {"val_top1": row["val_top1"] if val_loader is not None else -1.0, "epoch": epoch}
                    _save_weights(model, os.path.join(cfg.out, "best.safetensors"), meta)
                _save_weights(model, os.path.join(cfg.out, "last.safetensors"), meta)
                state_buf = io.BytesIO()
                torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "ema": ema.state_dict() if ema is not None else None, "epoch": epoch, "best": best,
                            "history": history}, state_buf)
                write_bytes(os.path.join(cfg.out, STATE_FILE), state_buf.getvalue())
                _write_metrics(cfg.out, history)
            D.barrier(dist)
            if tracker is not None:
                tracker.log_epoch(epoch, row)
            emit({"event": "epoch_end", **row})
            reason = halving.check(epoch, row["val_top1"]) if halving is not None else None
            reason = D.all_gather_objects(reason, dist)[0]  # rank 0 decides for all ranks
            if reason:
                stopped = {"stopped_after_epochs": epoch + 1, "stop_reason": reason}
                emit({"event": "stopped", **stopped})
                break
    except BaseException:
        if tracker is not None:
            tracker.finish({}, failed=True)
        raise

    last = history[-1] if history else {}
    summary = {"out": cfg.out, "loss": cfg.loss, "student": cfg.student, "epochs": cfg.epochs,
               "best_val_top1": best["val_top1"] if cfg.val_data else None, "best_epoch": best["epoch"],
               "last_val_top1": last.get("val_top1"), "seconds": time.perf_counter() - t_run,
               "train_seconds": sum(r["epoch_seconds"] for r in history), "params": params,
               "resumed_from_epoch": start_epoch if state is not None else None, **stopped,
               **({"class_map": data.class_map.to_dict()["sha256"], "num_classes": data.num_classes,
                   "labels": data.label_space, "train_samples": data.train_samples,
                   "cached_samples": data.cached_samples} if data.class_map else {})}
    if dist.is_main:
        if halving is not None and not stopped:
            halving.complete(last.get("val_top1", math.nan))
        if tracker is not None:
            tracker.finish(summary, {"pld.checkpoint": os.path.abspath(os.path.join(cfg.out, "best.safetensors")),
                                     "pld.last_checkpoint": os.path.abspath(os.path.join(cfg.out, "last.safetensors")),
                                     **({"pld.stop_reason": stopped["stop_reason"]} if stopped else {})})
        write_json(os.path.join(cfg.out, SUMMARY_FILE), summary)
    emit({"event": "end", **summary})
    return summary


# -- the named steps of a run ------------------------------------------------------------------------------
def _train_data(cfg: DistillConfig, temperature: float, needs_teacher: bool, device: torch.device,
                dist: D.DistInfo) -> StudentData:
    recipe = num_classes = None
    if not cfg.cache:
        recipe = recipe_of(cfg.recipe)
        classes = read_classes(expand_shards(cfg.data)[0])
        num_classes = cfg.num_classes or (len(classes) if classes else None)
        if num_classes is None:
            raise ValueError("Training without a cache needs --num-classes (or a classes.json beside the shards).")
    return StudentData(cfg.data, cache=cfg.cache, teacher=cfg.teacher, temperature=temperature,
                       batch_size=cfg.batch_size, seed=cfg.seed, view_policy=cfg.view_policy, top_k=cfg.top_k,
                       with_targets=needs_teacher and not cfg.online_teacher, workers=cfg.workers,
                       shuffle_buffer=cfg.shuffle_buffer, cache_dir=cfg.cache_dir,
                       num_classes=num_classes if num_classes is not None else cfg.num_classes, recipe=recipe,
                       image_field=cfg.image_field, label_field=cfg.label_field, pin_memory=device.type == "cuda",
                       student_size=cfg.student_size, rank=dist.rank, world_size=dist.world_size,
                       expect_digest=cfg.expect_digest, class_map=cfg.class_map, labels=cfg.labels)


TargetsFn = Callable[[Batch, torch.Tensor, torch.Tensor], "TeacherTargets | None"]


def _targets_source(cfg: DistillConfig, data: StudentData, temperature: float, needs_teacher: bool,
                    device: torch.device) -> TargetsFn:
    """Where a step's teacher targets come from: the cache (moved to the device), or, for the online-teacher
    baseline, a teacher run on the step's own views. The loop does not know which."""
    if not cfg.online_teacher or not needs_teacher:
        return lambda batch, x, y: None if batch.targets is None else batch.targets.to(device, device.type == "cuda")
    teacher_classes = data.teacher_classes or data.num_classes  # under a class map: the cached teacher's
    online = load_model(cfg.online_teacher, num_classes=None if cfg.online_teacher_pretrained else teacher_classes,
                        checkpoint=cfg.online_teacher_checkpoint, pretrained=cfg.online_teacher_pretrained)
    online = online.to(device).eval().to(memory_format=torch.channels_last)
    if output_width(online) != teacher_classes:
        raise ValueError(f"Online teacher {cfg.online_teacher} has {output_width(online)} classes, the data has "
                         f"{teacher_classes}.")
    prep = preprocessing_of(online)
    require_teacher_input(prep, cfg.online_teacher, size_given=True)  # views come at the recipe's size

    def run_teacher(batch: Batch, x: torch.Tensor, y: torch.Tensor) -> TeacherTargets:
        with torch.inference_mode():  # fp32, like cache-teacher's default: bf16 logits reorder the ranking
            logits = online(normalize(x, prep["mean"], prep["std"])).float()
        first = y if batch.mix is None else batch.mix.to(y.device).dominant(y)  # what the cache ranks first
        targets = TeacherTargets.from_logits(logits.clone(), first, temperature=temperature)
        return targets if data.class_map is None else map_targets(targets, data.class_map, first)

    return run_teacher


def _student(cfg: DistillConfig, num_classes: int, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.student, num_classes=num_classes, checkpoint=cfg.init_checkpoint, pretrained=cfg.pretrained)
    if output_width(model) != num_classes:
        raise ValueError(f"Student {cfg.student} has {output_width(model)} classes, the data has {num_classes}.")
    prep = student_preprocessing(model)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    return model, prep


def _optimizer(cfg: DistillConfig, model: torch.nn.Module, steps_per_epoch: int) -> tuple[Any, CosineLRScheduler]:
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    scheduler = CosineLRScheduler(optimizer, t_initial=steps_per_epoch * cfg.epochs, lr_min=cfg.min_lr,
                                  warmup_t=int(cfg.warmup_epochs * steps_per_epoch),
                                  warmup_lr_init=cfg.lr * 1e-3 if cfg.warmup_epochs else cfg.lr, t_in_epochs=False)
    return optimizer, scheduler


def _val_loader(cfg: DistillConfig, data: StudentData, device: torch.device, dist: D.DistInfo) -> DataLoader | None:
    if not cfg.val_data:
        return None
    val_set = EvalSamples(expand_shards(cfg.val_data), recipe=data.recipe, rank=dist.rank, world=dist.world_size,
                          num_classes=data.num_classes if data.label_map is None else data.teacher_classes,
                          image_field=data.image_field, label_field=cfg.label_field, student_size=cfg.student_size,
                          label_map=data.label_map)
    workers = cfg.workers if device.type == "cuda" else min(cfg.workers, 1)  # on a CPU the cores train
    return DataLoader(val_set, batch_size=cfg.batch_size * 2, num_workers=workers, pin_memory=device.type == "cuda",
                      prefetch_factor=4 if workers else None)


def _tracker(cfg: DistillConfig, data: StudentData, temperature: float | None, start_epoch: int) -> Tracker:
    """The run's tracked run: its settings, the cache it learned from, the sweep it belongs to."""
    fingerprint = data.fingerprint()
    params = {**asdict(cfg), "temperature_used": temperature, "num_classes": data.num_classes,
              "steps_per_epoch": len(data)}
    tags = {"pld.run_dir": os.path.abspath(cfg.out)}
    if fingerprint is not None:
        tags.update({"pld.cache_url": str(fingerprint["url"]), "pld.cache_fingerprint": fingerprint_digest(fingerprint)})
    nonce = sweep_nonce(cfg.sweep) if cfg.sweep else None
    parent = read_ids(cfg.sweep, nonce) if cfg.sweep else {}
    return Tracker(parse_log(cfg.log), cfg.out, os.path.basename(os.path.normpath(cfg.out)), params, tags,
                   start_epoch=start_epoch, group=parent.get("group"), parent=parent, nonce=nonce,
                   reuse_ids=start_epoch > 0)  # a fresh run never continues tracked runs a folder names


def _write_run_config(cfg: DistillConfig, data: StudentData, temperature: float | None, prep: dict[str, Any],
                      world_size: int) -> None:
    os.makedirs(cfg.out, exist_ok=True)
    run_config = {"config": asdict(cfg), "num_classes": data.num_classes, "recipe": data.recipe.to_dict(),
                  "temperature": temperature, "steps_per_epoch": len(data), "world_size": world_size,
                  "student_preprocessing": prep, "cache": data.fingerprint(),
                  "train_shards": [{"url": s.url, "nsamples": s.nsamples} for s in data.shards],
                  "train_samples": data.train_samples,
                  **({"sweep_nonce": sweep_nonce(cfg.sweep)} if cfg.sweep else {})}
    write_json(os.path.join(cfg.out, "config.json"), run_config)
