"""The `pld` command line: parses options, calls one library function per command, renders the result."""
from __future__ import annotations

import functools
import inspect
import logging
import os
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pld_pipeline import options  # torch-free: mistakes are refused before the heavy imports
from pld_pipeline.loss_names import BUILTIN_LOSSES as LOSSES  # torch-free: light commands never import torch

from .progress import ProgressReporter

class PldCommand(typer.core.TyperCommand):
    """Help that reads right at any width: a docstring's paragraphs reflow to the terminal (typer keeps the
    source's line breaks, which cut sentences at 80 columns), and a flag, which takes no value, shows no type
    (typer would print `<bool>` beside it)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.help:
            self.help = "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(self.help).split("\n\n"))
        _untyped_flags(self.params)

    def get_help_option(self, ctx: Any) -> Any:
        return _untyped(super().get_help_option(ctx))


class GroupHelpWithoutType(typer.core.TyperGroup):
    """`pld --help`: its flags (--version, --help) show no type either."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _untyped_flags(self.params)

    def get_help_option(self, ctx: Any) -> Any:
        return _untyped(super().get_help_option(ctx))


def _untyped_flags(params: list[Any]) -> None:
    for param in params:
        if getattr(param, "is_flag", False):
            param.metavar = ""


def _untyped(option: Any) -> Any:
    if option is not None:
        option.metavar = ""
    return option


app = typer.Typer(
    cls=GroupHelpWithoutType, name="pld", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Plackett-Luce distillation from cached teacher logits: cache the teacher once, train many students.")
out = Console(soft_wrap=True)  # paths and commands must stay copy-pasteable
err = Console(stderr=True, soft_wrap=True)

def _version(value: bool) -> None:
    if value:
        from pld_pipeline import __version__  # torch-free: the package imports its heavy parts lazily
        out.print(f"pld-pipeline {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the installed version (pld-pipeline X.Y.Z) and exit.")] = False) -> None:
    """Plackett-Luce distillation from cached teacher logits: cache the teacher once, train many students."""


DATA = "Data"
TEACHER = "Teacher"
VIEWS = "Views"
CACHE = "Cache"
RUN = "Run"
LAUNCH = "Launch"
HALVING = "Early stopping"
AUDIT = "Audit"
LOG_HELP = ("Experiment tracking, comma-separated: tensorboard (event files in the run directory), mlflow "
            "(MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME), wandb (WANDB_MODE, WANDB_PROJECT). Nothing is logged "
            "unless asked; a backend that fails only warns.")


def _rank() -> int:
    text = os.environ.get("RANK", "0")
    if not text.isdigit():
        raise ValueError(f"Environment variable RANK={text!r} is not a process rank; torchrun sets it (unset it when "
                         "not running under torchrun).")
    return int(text)


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Every failure ends in one line naming the problem and the fix (pld_pipeline.errors.one_line: an unknown
    one is called an internal error), not a traceback; PLD_DEBUG=1 shows the traceback instead."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise  # typer's own exits and usage errors
        except Exception as e:  # noqa: BLE001 - the one place every failure is turned into one line
            if os.environ.get("PLD_DEBUG"):
                raise
            from pld_pipeline.errors import one_line
            err.print(f"[bold red]error:[/] {escape(one_line(e))}", highlight=False, soft_wrap=True)
            # an HTTP session left open by the failed read is reported by asyncio at exit ("Unclosed client
            # session"): the line above already said what failed
            logging.getLogger("asyncio").setLevel(logging.CRITICAL)
            raise typer.Exit(code=2) from None
    return wrapper


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers, got {text!r}.") from None


def _class_names(path: Optional[Path], data: str) -> Optional[list[str]]:
    from pld_pipeline.data import expand_shards
    from pld_pipeline.shards import read_classes
    if path is not None:
        from pld_pipeline.files import json_field, read_json
        doc = read_json(str(path))
        names = json_field(doc, str(path), "class_names", kind=list) if isinstance(doc, dict) else doc
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"--class-names {path}: expected a JSON list of strings (or {{\"class_names\": [...]}}).")
        return names
    return read_classes(expand_shards(data)[0])


@app.command("cache-teacher", cls=PldCommand)
@friendly_errors
def cache_teacher_cmd(
    data: Annotated[str, typer.Option(help="Webdataset shards: path, fsspec URL, pipe:, or brace pattern.", rich_help_panel=DATA)],
    out_: Annotated[str, typer.Option("--out", help="Cache location (local path or fsspec URL).", rich_help_panel=CACHE)],
    teacher: Annotated[list[str], typer.Option(help="Teacher: timm name or module.path:factory. Repeat for several teachers (decoded once).", rich_help_panel=TEACHER)],
    teacher_checkpoint: Annotated[Optional[list[str]], typer.Option(help="Checkpoint for each --teacher, in order (.pth/.pt/.th/.safetensors).", rich_help_panel=TEACHER)] = None,
    pretrained: Annotated[bool, typer.Option("--pretrained", help="Load every --teacher's hub weights through timm (pretrained tags like convnext_base.fb_in22k_ft_in1k, hf-hub:org/name; the Hugging Face cache, HF_HOME and HF_HUB_OFFLINE apply). The cache records hub id, tag, revision and the weight file's sha256.", rich_help_panel=TEACHER)] = False,
    teacher_name: Annotated[Optional[list[str]], typer.Option(help="Id to store each --teacher under (default: from its name).", rich_help_panel=TEACHER)] = None,
    num_classes: Annotated[Optional[int], typer.Option(help="Classes (default: the teacher's output width).", rich_help_panel=TEACHER)] = None,
    mean: Annotated[Optional[str], typer.Option(help="Override the teachers' normalisation mean, e.g. 0.5,0.5,0.5.", rich_help_panel=TEACHER)] = None,
    std: Annotated[Optional[str], typer.Option(help="Override the teachers' normalisation std.", rich_help_panel=TEACHER)] = None,
    views: Annotated[int, typer.Option(help="Augmented views per sample (rerun with more to add views).", rich_help_panel=VIEWS)] = 8,
    recipe: Annotated[str, typer.Option(help="View recipe: cifar (pad+crop+flip), imagenet (RandomResizedCrop+flip), none (eval view).", rich_help_panel=VIEWS)] = "cifar",
    size: Annotated[Optional[int], typer.Option(help="View size in pixels (default: the first teacher's input size).", rich_help_panel=VIEWS)] = None,
    pad: Annotated[int, typer.Option(help="cifar recipe: padding before the random crop.", rich_help_panel=VIEWS)] = 4,
    scale: Annotated[str, typer.Option(help="imagenet recipe: RandomResizedCrop scale range.", rich_help_panel=VIEWS)] = "0.08,1.0",
    ratio: Annotated[str, typer.Option(help="imagenet recipe: RandomResizedCrop aspect range.", rich_help_panel=VIEWS)] = "0.75,1.3333333333333333",
    crop_pct: Annotated[float, typer.Option(help="Eval view: centre crop fraction (imagenet/none).", rich_help_panel=VIEWS)] = 0.875,
    no_flip: Annotated[bool, typer.Option("--no-flip", help="Never flip views horizontally.", rich_help_panel=VIEWS)] = False,
    clean_view: Annotated[bool, typer.Option(help="Make view 0 the clean eval view.", rich_help_panel=VIEWS)] = False,
    mix: Annotated[Optional[str], typer.Option(help="Mixed views: cutmix, mixup or both (timm Mixup semantics; the teacher sees the mixed image, the student replays it).", rich_help_panel=VIEWS)] = None,
    mix_prob: Annotated[float, typer.Option(help="--mix: share of views that are mixed (the rest stay plain).", rich_help_panel=VIEWS)] = 0.5,
    mixup_alpha: Annotated[float, typer.Option(help="--mix: Mixup lambda ~ Beta(alpha, alpha).", rich_help_panel=VIEWS)] = 0.8,
    cutmix_alpha: Annotated[float, typer.Option(help="--mix: CutMix lambda ~ Beta(alpha, alpha).", rich_help_panel=VIEWS)] = 1.0,
    cutmix_minmax: Annotated[Optional[str], typer.Option(help="--mix: CutMix box sides as a min,max fraction of the view (instead of from lambda).", rich_help_panel=VIEWS)] = None,
    mix_switch_prob: Annotated[float, typer.Option(help="--mix both: chance of CutMix over Mixup.", rich_help_panel=VIEWS)] = 0.5,
    mix_window: Annotated[int, typer.Option(help="--mix: partners come from this many samples before each one in its shard.", rich_help_panel=VIEWS)] = 64,
    seed: Annotated[int, typer.Option(help="Global view seed.", rich_help_panel=VIEWS)] = 0,
    top_k: Annotated[int, typer.Option(help="Classes stored per view, by teacher rank.", rich_help_panel=CACHE)] = 32,
    full: Annotated[bool, typer.Option(help="Store all classes (k = num_classes).", rich_help_panel=CACHE)] = False,
    teacher_precision: Annotated[str, typer.Option(help="Teacher forward: fp32 (exact logits, the default) or bf16 (autocast: faster on GPUs, logits rounded; recorded in the cache).", rich_help_panel=TEACHER)] = "fp32",
    temperatures: Annotated[str, typer.Option(help="Temperature grid for exact teacher weights, e.g. 1,2,4.", rich_help_panel=CACHE)] = "1,2,4",
    class_names: Annotated[Optional[Path], typer.Option(help="JSON list (or {class_names: [...]}) of class names; default: classes.json beside the shards.", rich_help_panel=DATA)] = None,
    image_field: Annotated[str, typer.Option(help="Image extension(s), ;-separated, first present wins; recorded in the cache's view recipe, so students read the same image.", rich_help_panel=DATA)] = "jpg;jpeg;png;webp",
    label_field: Annotated[str, typer.Option(help="Label extension.", rich_help_panel=DATA)] = "cls",
    on_bad_sample: Annotated[str, typer.Option(help="error: stop on an undecodable image; skip: record and skip it.", rich_help_panel=DATA)] = "error",
    batch_size: Annotated[int, typer.Option(help="Views per teacher forward.", rich_help_panel=RUN)] = 256,
    workers: Annotated[Optional[int], typer.Option(help="DataLoader decode workers [default: 2 on CPU, up to 8 per GPU].", rich_help_panel=RUN)] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.", rich_help_panel=RUN)] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Delete what is at --out and start over.", rich_help_panel=CACHE)] = False,
    claim_ttl: Annotated[float, typer.Option(help="Seconds a worker's claim on a shard lasts unless refreshed: overlapping workers skip shards claimed by a live worker and take over those of a dead one after this.", rich_help_panel=RUN)] = 600.0,
    save_seconds: Annotated[float, typer.Option(help="A shard in progress saves its finished rows every this many seconds: a crash or kill loses at most that much teacher work (plus one batch) per shard in progress; Ctrl-C keeps every finished row.", rich_help_panel=RUN)] = 60.0,
    save_rows: Annotated[Optional[int], typer.Option(help="Also save every this many finished rows, whichever comes first (each save rewrites the shard's stored objects: see docs/results.md for the cost).", rich_help_panel=RUN)] = None,
    part: Annotated[str, typer.Option(help="I/N: this independent worker (SLURM array task, Kubernetes indexed job, another machine) caches shards s with s % N == I (0-based); part 0 creates the cache, the others wait for it.", rich_help_panel=RUN)] = "0/1",
    quiet: Annotated[bool, typer.Option(help="No progress output.", rich_help_panel=RUN)] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.", rich_help_panel=RUN)] = False,
) -> None:
    """Run teachers once over sharded data and store their top-k logits per (sample, view) in a Zarr v3 cache.

    Rerunning the same command resumes; adding --teacher or raising --views extends the cache. Under
    `torchrun --nproc_per_node N` the shards are split across processes.
    """
    checkpoints = teacher_checkpoint or []
    names = teacher_name or []
    temps = _floats(temperatures, "--temperatures")
    options.check_cache_teacher(data=data, teachers=teacher, checkpoints=checkpoints, names=names,
                                class_names=None if class_names is None else str(class_names), temperatures=temps,
                                top_k=None if full else top_k, views=views, recipe=recipe,
                                save_rows=save_rows, save_seconds=save_seconds)
    from pld_pipeline.cache_teacher import CacheTeacherConfig, TeacherSpec, cache_teacher  # seconds: after the checks

    specs = [TeacherSpec(source=t, checkpoint=(checkpoints[i] or None) if checkpoints else None,
                         name=names[i] if names else None, pretrained=pretrained,
                         mean=_floats(mean, "--mean") if mean else None, std=_floats(std, "--std") if std else None)
             for i, t in enumerate(teacher)]
    overrides: dict[str, Any] = {"pad": pad, "scale": _floats(scale, "--scale"), "ratio": _floats(ratio, "--ratio"),
                                 "crop_pct": crop_pct, "flip": not no_flip}
    if mix is not None:
        from pld_pipeline.views import MixRecipe
        minmax = _floats(cutmix_minmax, "--cutmix-minmax") if cutmix_minmax else None
        overrides["mix"] = MixRecipe(mode=mix, prob=mix_prob, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
                                     minmax=None if minmax is None else tuple(minmax), switch_prob=mix_switch_prob,
                                     window=mix_window).to_dict()
    cfg = CacheTeacherConfig(
        data=data, out=out_, teachers=specs, views=views, recipe=recipe, size=size, recipe_overrides=overrides,
        clean_view=clean_view, seed=seed, k=None if full else top_k, temperatures=temps,
        num_classes=num_classes, class_names=_class_names(class_names, data), batch_size=batch_size, workers=workers,
        device=device, image_field=image_field, label_field=label_field, on_bad_sample=on_bad_sample,
        overwrite=overwrite, precision=teacher_precision, part=_part(part), claim_ttl=claim_ttl,
        save_rows=save_rows, save_seconds=save_seconds)
    reporter = ProgressReporter(quiet=quiet or json_, rank=_rank())
    try:
        with reporter.keeping_ctrl_c():
            summary = cache_teacher(cfg, reporter)
    except KeyboardInterrupt:
        reporter.cache_teacher_interrupted()
        raise typer.Exit(code=130) from None
    if _rank() != 0:
        return
    if json_:
        out.print_json(data=summary)
        return
    acc = ", ".join(f"{t}: {a * 100:.2f}%" for t, a in summary["teacher_accuracy"].items() if a is not None)
    out.print(f"cached {summary['items']} views from {summary['shards_written']} shard(s) in {summary['seconds']:.1f}s "
              f"({summary['items_per_s']:.0f} views/s) -> {summary['cache']}"
              + (f" | teacher top-1 on cached views: {acc}" if acc else "")
              + (f" | skipped {summary['skipped_samples']} bad sample(s)" if summary["skipped_samples"] else ""))
    if summary["repaired_units"]:
        out.print(f"repaired {len(summary['repaired_units'])} damaged unit(s): {', '.join(summary['repaired_units'])}")
    out.print(f"digest: {summary['digest']}" + ("" if summary["complete"] else "  (the cache is not complete yet: "
              "its digest changes as the other workers write; publish the one `pld inspect` prints once it is)"),
              highlight=False)
    _print_warnings(summary["warnings"])


def _print_table(table: Table) -> None:
    """A table at its natural width when stdout is not a terminal (CI logs, `| tee`, notebooks): rich would
    otherwise squeeze it into 80 columns and cut model names and keys short."""
    if out.is_terminal:
        out.print(table)
        return
    saved = out.width
    out.width = max(saved, _natural_width(table))
    try:
        out.print(table)
    finally:
        out.width = saved


def _natural_width(table: Table) -> int:
    from rich.measure import Measurement
    return Measurement.get(out, out.options.update(width=10_000), table).maximum


def _print_warnings(warnings: list[str]) -> None:
    for w in warnings:
        err.print(f"[bold yellow]WARNING:[/] {escape(w)}", highlight=False, soft_wrap=True)


@app.command("inspect", cls=PldCommand)
@friendly_errors
def inspect_cmd(
    cache: Annotated[str, typer.Argument(help="Cache path or URL.")],
    json_: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    key: Annotated[Optional[str], typer.Option(help="Show where one sample is (shard, row, label, status), found through the key index.")] = None,
    expect_digest: Annotated[Optional[str], typer.Option(help="Refuse the cache unless its digest is this sha256:HEX (as published beside it).")] = None,
    class_map: Annotated[Optional[str], typer.Option(help="Also show what this class map (as `pld distill --class-map`) does: each teacher's out-of-map mass and its top-1 accuracy in the student's classes, over up to 8 shards.")] = None,
    labels: Annotated[Optional[str], typer.Option(help="With --class-map: teacher or student, the classes the cached labels are in (as `pld distill --labels`); the student top-1 counts only views whose label is in the map.")] = None,
) -> None:
    """Show what a cache holds: teachers, classes, k, views, temperatures, completion, size, teacher tail mass."""
    from pld_pipeline.cache import inspect_cache
    if key is not None:
        _print_key(cache, key, json_, expect_digest)
        return
    info = inspect_cache(cache, expect_digest=expect_digest)
    if class_map is not None:
        from pld_pipeline.class_map import inspect_class_map
        info["class_map"] = inspect_class_map(cache, class_map, expect_digest=expect_digest, labels=labels)
    if json_:
        out.print_json(data=info)
        return
    # strings from the cache are a stranger's text: shown as text, never as rich markup (links, styles)
    t = Table(title=escape(f"{info['url']}  ({info['format']})"), show_header=False)
    t.add_row("classes", str(info["num_classes"]) + (escape(f"  ({', '.join(map(str, info['class_names'][:10]))}{'...' if len(info['class_names']) > 10 else ''})") if info["class_names"] else ""))
    t.add_row("samples", f"{info['samples']:,} in {info['shards_total']} shard(s), {info['shards_done']} complete")
    mix = info["recipe"].get("mix")
    mixed = f"; mixed views: {mix['mode']}, {mix['prob']:g} of them" if mix else ""
    t.add_row("views", escape(f"{info['views']} per sample, recipe {info['recipe']['name']} size {info['recipe']['size']}, "
                              f"seed {info['seed']}{mixed}"))
    t.add_row("key index", info["key_index"])
    if info["bytes_on_disk"] is not None:
        t.add_row("on disk", f"{info['bytes_on_disk'] / 2**20:.2f} MiB, {info['bytes_per_view']:.1f} bytes per view")
    out.print(t)
    # the digest is copied into --expect-digest: a line of its own, never cut to the table's width
    out.print(f"digest: {info['digest'] or 'none (a metadata document is not JSON: run `pld verify`)'}"
              + ("" if info["complete"] else "  (incomplete cache: the digest changes as units are added)"),
              highlight=False, soft_wrap=True)
    columns = ("source", "k", "temperatures", "shards done", "top-1 on cached views", "tail mass p50/p90/max")
    rows = {}
    for tid, d in info["teachers"].items():
        tm = d["tail_mass"]
        acc = d["accuracy_on_cached_views"]
        rows[tid] = (escape(str(d["source"])), f"{d['k']}{' (full)' if d['full'] else ''}",
                     ",".join(f"{x:g}" for x in d["temperatures"]), f"{d['shards_done']}/{info['shards_total']}",
                     "-" if acc is None else f"{acc * 100:.2f}%",
                     "-" if not tm else f"{tm['p50']:.4f} / {tm['p90']:.4f} / {tm['max']:.4f}")
    tt = Table(title="teachers")
    for col in ("id",) + columns:
        tt.add_column(col)
    for tid, row in rows.items():
        tt.add_row(escape(tid), *row)
    if _natural_width(tt) <= out.width or not out.is_terminal:
        _print_table(tt)
    else:  # too narrow for one row per teacher: a block per teacher, its id on a line of its own (never cut)
        for tid, row in rows.items():
            out.print(f"teacher {escape(tid)}", highlight=False, soft_wrap=True)
            block = Table(show_header=False, box=None, padding=(0, 2))
            block.add_column(overflow="fold")
            block.add_column(overflow="fold")
            for col, value in zip(columns, row):
                block.add_row(col, value)
            out.print(block)
    if class_map is not None:
        cm = info["class_map"]
        mt = Table(title=f"class map {class_map}: {cm['student_classes']} student classes from "
                         f"{cm['mapped_teacher_classes']} of {cm['teacher_classes']} teacher classes; labels in the "
                         f"{cm['labels']}'s classes")
        for col in ("teacher", "out-of-map mass mean/p90/max", "upper bound (+ tail) mean",
                    "student top-1 (views labelled in the map)", "views outside the map"):
            mt.add_column(col)
        for tid, d in cm["teachers"].items():
            lo, hi, acc = d["out_of_map_mass"], d["out_of_map_mass_upper"], d["student_accuracy_on_cached_views"]
            mt.add_row(tid, "-" if not lo else f"{lo['mean']:.4f} / {lo['p90']:.4f} / {lo['max']:.4f}",
                       "-" if not hi else f"{hi['mean']:.4f}",
                       "-" if acc is None else f"{acc * 100:.2f}% of {d['views_in_the_map']}",
                       str(d["views_with_labels_outside_the_map"]))
        out.print(mt)
    _print_warnings(info["warnings"])


def _print_key(cache: str, key: str, json_: bool, expect_digest: Optional[str] = None) -> None:
    from pld_pipeline.cache import Cache
    from pld_pipeline.cache import schema
    reader = Cache(cache, expect_digest=expect_digest)
    where = reader.find(key)
    if where is None:
        raise ValueError(f"{cache} holds no sample with key {key!r}.")
    shard, row = where
    samples = reader.samples(shard)
    info = {"key": key, "shard": shard, "shard_name": reader.meta.shards[shard].name, "row": row,
            "label": int(samples[schema.LABEL.path()][row]), "status": int(samples[schema.STATUS.path()][row]),
            "digest": bytes(samples[schema.DIGEST.path()][row]).hex()}
    if json_:
        out.print_json(data=info)
    else:
        out.print(" ".join(f"{k}={v}" for k, v in info.items()), highlight=False)


@app.command("verify", cls=PldCommand)
@friendly_errors
def verify_cmd(
    cache: Annotated[str, typer.Argument(help="Cache path or URL.")],
    json_: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    expect_digest: Annotated[Optional[str], typer.Option(help="Refuse the cache unless its digest is this sha256:HEX (as published beside it).")] = None,
    audit: Annotated[Optional[int], typer.Option(help="Instead of the unit checks: re-run the teacher on this many randomly drawn cached (sample, view) pairs, replayed from --data, with the preprocessing the cache records, and compare with the cached targets (exit 1 beyond --tolerance, or where the agreement contradicts the recorded precision).", rich_help_panel=AUDIT)] = None,
    data: Annotated[Optional[str], typer.Option(help="--audit: the cached shards (a subset is fine).", rich_help_panel=AUDIT)] = None,
    teacher: Annotated[Optional[str], typer.Option(help="--audit: the teacher, timm name or module.path:factory.", rich_help_panel=AUDIT)] = None,
    teacher_checkpoint: Annotated[Optional[str], typer.Option(help="--audit: its weights (.pth/.pt/.th/.safetensors); their sha256 is compared with the recorded one.", rich_help_panel=AUDIT)] = None,
    pretrained: Annotated[bool, typer.Option("--pretrained", help="--audit: load the teacher's hub weights through timm.", rich_help_panel=AUDIT)] = False,
    teacher_id: Annotated[Optional[str], typer.Option(help="--audit: which cached teacher, when the cache holds several.", rich_help_panel=AUDIT)] = None,
    seed: Annotated[int, typer.Option(help="--audit: seed of the draw.", rich_help_panel=AUDIT)] = 0,
    device: Annotated[str, typer.Option(help="--audit: auto, cpu, cuda, cuda:N.", rich_help_panel=AUDIT)] = "auto",
    tolerance: Annotated[Optional[str], typer.Option(help="--audit: allowed |log-prob| difference, a number or a precision (fp32: 2e-3, bf16: 0.15). Default fp32 (strict), whatever precision the cache records.", rich_help_panel=AUDIT)] = None,
) -> None:
    """Check every unit: complete, checksums and metadata binding match, labels, indices and values valid.
    Lists every damaged unit and how to repair it (exit 1); warns about near-chance teachers. With --audit N,
    re-runs the teacher on N cached views instead and compares its outputs with the cached targets."""
    if audit is not None:
        if data is None or teacher is None:
            raise ValueError("--audit needs --data (the cached shards) and --teacher (and its weights: "
                             "--teacher-checkpoint or --pretrained).")
        from pld_pipeline.audit import audit_cache
        _print_audit(audit_cache(cache, data, teacher, checkpoint=teacher_checkpoint, pretrained=pretrained,
                                 teacher_id=teacher_id, n=audit, seed=seed, device=device,
                                 expect_digest=expect_digest, tolerance=tolerance), json_)
        return
    from pld_pipeline.cache import verify_cache
    report = verify_cache(cache, expect_digest=expect_digest)
    if json_:
        out.print_json(data=report.to_dict())
    elif report.ok:
        out.print(f"ok: {report.units_checked} unit(s) verified in {cache}, digest {report.digest}", highlight=False)
    else:
        err.print(f"[bold red]{len(report.problems)} problem(s)[/] in {cache} ({report.units_checked} unit(s) checked):")
        for p in report.problems:
            err.print(f"  {p}", highlight=False, soft_wrap=True)
        err.print(f"to repair: {report.fix}", highlight=False, soft_wrap=True)
    if not json_:
        _print_warnings(report.warnings)
    if not report.ok:
        raise typer.Exit(code=1)


def _print_audit(report: Any, json_: bool) -> None:
    if json_:
        out.print_json(data=report.to_dict())
    else:
        s, w = report.summary(), report.weights
        t = Table(title=f"audit of teacher '{report.teacher}' in {report.cache}", show_header=False)
        t.add_row("teacher", f"{report.source['given']} (recorded: {report.source['recorded']}), recorded precision "
                             f"{report.precision}, tolerance {report.tolerance:g} (--tolerance)")
        t.add_row("weights sha256", {True: "match the recorded ones", False: f"DIFFER: given {w['given_sha256'] or 'none (random init)'}, "
                                     f"recorded {w['recorded_sha256'] or 'none'}", None: "none recorded, none given"}[w["match"]])
        t.add_row("views audited", f"{s['views']} ({s['mixed']} mixed), {s['failed']} beyond tolerance")
        t.add_row("top-1 agreement", f"{s['top1_agreement'] * 100:.1f}%")
        t.add_row("max |log-prob| diff", f"top-k {s['max_logp_diff']:.3g}, label {s['max_label_logp_diff']:.3g}, "
                                         f"log-partition {s['max_logz_diff']:.3g}")
        t.add_row("rank mismatches", str(s["rank_mismatches"]))
        _print_table(t)
        wt = Table(title="worst views")
        for col in ("key", "shard/row", "view", "kind", "top-k diff", "label diff", "logz diff", "ranks off", "ok"):
            wt.add_column(col)
        for v in report.worst():
            wt.add_row(v.key, f"{v.shard}/{v.row}", str(v.view), v.kind, f"{v.max_logp_diff:.3g}",
                       f"{v.label_logp_diff:.3g}", f"{v.logz_diff:.3g}", str(v.rank_mismatches), "yes" if v.ok else "NO")
        _print_table(wt)
        for note in report.notes:
            err.print(f"[bold yellow]NOTE:[/] {note}", highlight=False, soft_wrap=True)
        failed = [v.key for v in report.views if not v.ok]
        if report.contradiction():
            err.print(f"[bold red]audit failed[/]: {report.contradiction()}", highlight=False, soft_wrap=True)
        if failed:  # the last line is the verdict
            err.print(f"[bold red]audit failed[/]: {len(failed)} view(s) differ from the teacher's outputs beyond "
                      f"tolerance, e.g. {', '.join(failed[:5])}", highlight=False, soft_wrap=True)
        elif not report.views:
            err.print("[bold red]audit failed[/]: no cached view was audited", highlight=False)
        elif not report.contradiction():
            out.print(f"audit passed: all {len(report.views)} view(s) re-run by the teacher match the cache within "
                      f"tolerance {report.tolerance:g}", highlight=False, soft_wrap=True)
    if not report.ok:
        raise typer.Exit(code=1)


def _part(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--part {text!r} must look like I/N, e.g. 0/4 (0-based).") from None
    if n < 1:
        raise ValueError(f"--part {text}: N must be >= 1.")
    return i, n


def _param_help(name: str, what: str) -> str:
    """Help for a loss parameter, from the loss registry: which losses take it and their defaults."""
    takers = {e.name: e.params[name] for e in LOSSES.values() if name in e.params}
    defaults = sorted({f"{v:g}" if isinstance(v, float) else str(v) for v in takers.values()})
    return f"{'/'.join(takers)}: {what} (default {', '.join(defaults)})."


STUDENT = "Student"
LOSS = "Loss"
OPTIM = "Optimisation"


@app.command("distill", cls=PldCommand)
@friendly_errors
def distill_cmd(
    data: Annotated[str, typer.Option(help="Training shards (the cached ones, or a subset).", rich_help_panel=DATA)],
    student: Annotated[str, typer.Option(help="Student: timm name (incl. cifar_resnet*) or module.path:factory.", rich_help_panel=STUDENT)],
    out_: Annotated[str, typer.Option("--out", help="Run directory: checkpoints, metrics, config.json.", rich_help_panel=RUN)],
    cache: Annotated[Optional[str], typer.Option(help="Teacher cache from `pld cache-teacher` (not needed for --loss ce).", rich_help_panel=DATA)] = None,
    val_data: Annotated[Optional[str], typer.Option(help="Validation shards, evaluated each epoch on the clean view.", rich_help_panel=DATA)] = None,
    cache_dir: Annotated[Optional[str], typer.Option(help="Local block cache for a remote --cache (s3://, gs://, http://): each byte is fetched once.", rich_help_panel=DATA)] = None,
    expect_digest: Annotated[Optional[str], typer.Option(help="Refuse the cache unless its digest is this sha256:HEX (published beside a shared cache; `pld inspect` prints it), before anything is trained or written.", rich_help_panel=DATA)] = None,
    loss: Annotated[str, typer.Option(help=f"One of: {', '.join(LOSSES)}.", rich_help_panel=LOSS)] = "pld",
    teacher: Annotated[Optional[str], typer.Option(help="Cached teacher id, when the cache holds several; 'a,b' learns from an ensemble: the teachers' probabilities averaged per view, ranked anew (exact from full caches; from top-k caches each class is short by at most the mean tail mass).", rich_help_panel=LOSS)] = None,
    temperature: Annotated[Optional[float], typer.Option(help="Teacher temperature (default: " + ", ".join(f"{e.name} {e.temperature:g}" for e in LOSSES.values() if e.needs_teacher) + "); must be in the cache's grid.", rich_help_panel=LOSS)] = None,
    alpha: Annotated[Optional[float], typer.Option(help=_param_help("alpha", "weight of the true-label cross-entropy"), rich_help_panel=LOSS)] = None,
    beta: Annotated[Optional[float], typer.Option(help=_param_help("beta", "inter-class relation weight"), rich_help_panel=LOSS)] = None,
    gamma: Annotated[Optional[float], typer.Option(help=_param_help("gamma", "intra-class relation weight"), rich_help_panel=LOSS)] = None,
    mixed_first: Annotated[Optional[str], typer.Option(help=_param_help("mixed_first", "class ranked first for a mixed (CutMix/Mixup) view: the dominant label, or the teacher's own ranking"), rich_help_panel=LOSS)] = None,
    view_policy: Annotated[str, typer.Option(help="Which cached view per epoch: rotate (per-sample offset) or random.", rich_help_panel=LOSS)] = "rotate",
    top_k: Annotated[Optional[int], typer.Option(help="Use only the first k cached classes (as if cached with --top-k k).", rich_help_panel=LOSS)] = None,
    class_map: Annotated[Optional[str], typer.Option(help="JSON list, one entry per student class: the cached teacher's class(es) it covers, by index or name ([0, 1, 8, 9], [[0], [1, 9], [8]], [\"airplane\", ...]). The student learns the teacher's mass of each group, renormalised over the mapped classes; its labels and accuracy are in its own classes.", rich_help_panel=LOSS)] = None,
    labels: Annotated[Optional[str], typer.Option(help="The classes the shards' labels are in under --class-map: teacher (each label is mapped to the student class whose group holds it; samples in no group are skipped, in training and validation) or student (label j is map entry j). Default: decided from the labels (one >= the map's size is a teacher class), the shards' classes.json, or refused when ambiguous.", rich_help_panel=LOSS)] = None,
    online_teacher: Annotated[Optional[str], typer.Option(help="Baseline only: run this teacher on every step instead of reading a cache.", rich_help_panel=LOSS)] = None,
    online_teacher_checkpoint: Annotated[Optional[str], typer.Option(help="Checkpoint for --online-teacher.", rich_help_panel=LOSS)] = None,
    online_teacher_pretrained: Annotated[bool, typer.Option("--online-teacher-pretrained", help="Load --online-teacher's hub weights through timm.", rich_help_panel=LOSS)] = False,
    init_checkpoint: Annotated[Optional[str], typer.Option(help="Start the student from these weights.", rich_help_panel=STUDENT)] = None,
    pretrained: Annotated[bool, typer.Option("--pretrained", help="Start the student from its timm hub weights (its classifier is re-sized to the data's classes).", rich_help_panel=STUDENT)] = False,
    student_size: Annotated[Optional[int], typer.Option(help="Train and evaluate the student at this resolution: each replayed teacher view is resized to it (antialiased). The targets stay those of the full-resolution view: the usual way to distill into a fast low-resolution student.", rich_help_panel=STUDENT)] = None,
    num_classes: Annotated[Optional[int], typer.Option(help="Classes, only without --cache (default: classes.json beside the shards).", rich_help_panel=STUDENT)] = None,
    recipe: Annotated[str, typer.Option(help="Without --cache: augmentation recipe (cifar, imagenet, none).", rich_help_panel=STUDENT)] = "cifar",
    size: Annotated[int, typer.Option(help="Without --cache: input size.", rich_help_panel=STUDENT)] = 32,
    pad: Annotated[int, typer.Option(help="Without --cache, cifar recipe: padding before the random crop.", rich_help_panel=STUDENT)] = 4,
    epochs: Annotated[int, typer.Option(help="Epochs.", rich_help_panel=OPTIM)] = 10,
    eval_every: Annotated[int, typer.Option(help="Evaluate every N epochs (and after the last).", rich_help_panel=RUN)] = 1,
    batch_size: Annotated[int, typer.Option(help="Batch size per process.", rich_help_panel=OPTIM)] = 128,
    opt: Annotated[str, typer.Option(help="timm optimizer: adamw, lamb, sgd, ...", rich_help_panel=OPTIM)] = "adamw",
    lr: Annotated[float, typer.Option(help="Peak learning rate.", rich_help_panel=OPTIM)] = 1e-3,
    weight_decay: Annotated[float, typer.Option(help="Weight decay.", rich_help_panel=OPTIM)] = 0.05,
    momentum: Annotated[float, typer.Option(help="SGD momentum.", rich_help_panel=OPTIM)] = 0.9,
    warmup_epochs: Annotated[float, typer.Option(help="Linear warmup epochs before the cosine decay.", rich_help_panel=OPTIM)] = 1.0,
    min_lr: Annotated[float, typer.Option(help="Final learning rate of the cosine schedule.", rich_help_panel=OPTIM)] = 1e-6,
    clip_grad: Annotated[Optional[float], typer.Option(help="Clip the gradient norm to this value.", rich_help_panel=OPTIM)] = None,
    ema_decay: Annotated[Optional[float], typer.Option(help="Keep an EMA of the weights with this decay (e.g. 0.999).", rich_help_panel=OPTIM)] = None,
    seed: Annotated[int, typer.Option(help="Seed for init, data order and views.", rich_help_panel=RUN)] = 0,
    workers: Annotated[Optional[int], typer.Option(help="DataLoader decode workers [default: 2 on CPU, up to 8 per GPU].", rich_help_panel=RUN)] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.", rich_help_panel=RUN)] = "auto",
    deterministic: Annotated[bool, typer.Option("--deterministic", help="Deterministic kernels only: a resumed CUDA run repeats the uninterrupted one bit for bit (slower; no cuDNN autotuning).", rich_help_panel=RUN)] = False,
    no_amp: Annotated[bool, typer.Option("--no-amp", help="No bf16 autocast on CUDA.", rich_help_panel=RUN)] = False,
    no_channels_last: Annotated[bool, typer.Option("--no-channels-last", help="Keep NCHW memory format.", rich_help_panel=RUN)] = False,
    shuffle_buffer: Annotated[int, typer.Option(help="Samples in the shuffle buffer per worker.", rich_help_panel=RUN)] = 1000,
    image_field: Annotated[Optional[str], typer.Option(help="Image extension(s), ;-separated. Default: the cache's (recorded with its views), else jpg;jpeg;png;webp.", rich_help_panel=DATA)] = None,
    label_field: Annotated[str, typer.Option(help="Label extension (only without --cache).", rich_help_panel=DATA)] = "cls",
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last finished epoch.", rich_help_panel=RUN)] = False,
    log: Annotated[Optional[str], typer.Option(help=LOG_HELP, rich_help_panel=RUN)] = None,
    sweep: Annotated[Optional[str], typer.Option(help="The sweep directory this run belongs to (written by `pld sweep --print-commands`): its halving study and tracking parent run.", rich_help_panel=RUN)] = None,
    quiet: Annotated[bool, typer.Option(help="No progress output.", rich_help_panel=RUN)] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.", rich_help_panel=RUN)] = False,
) -> None:
    """Train a student from cached teacher logits (no teacher is loaded), or with --loss ce from labels alone.

    Writes best/last checkpoints (.safetensors + .json), metrics.jsonl, metrics.csv and config.json to --out.
    Under `torchrun --nproc_per_node N` it trains with DDP (gloo on CPU, nccl on GPU).
    """
    options.check_distill(data=data, student=student, loss=loss, cache=cache, val_data=val_data, teacher=teacher,
                          temperature=temperature, expect_digest=expect_digest, class_map=class_map,
                          num_classes=num_classes, online_teacher=online_teacher, init_checkpoint=init_checkpoint)
    from pld_pipeline.distill import DistillConfig, distill  # seconds (torch, timm): after the checks

    cfg = DistillConfig(
        data=data, out=out_, student=student, loss=loss, cache=cache, cache_dir=cache_dir, expect_digest=expect_digest,
        val_data=val_data, teacher=teacher,
        temperature=temperature, alpha=alpha, beta=beta, gamma=gamma, mixed_first=mixed_first, view_policy=view_policy, epochs=epochs,
        batch_size=batch_size, opt=opt, lr=lr, weight_decay=weight_decay, momentum=momentum,
        warmup_epochs=warmup_epochs, min_lr=min_lr, clip_grad=clip_grad, ema_decay=ema_decay,
        channels_last=not no_channels_last, amp=not no_amp, seed=seed, workers=workers, device=device,
        deterministic=deterministic, init_checkpoint=init_checkpoint, num_classes=num_classes, recipe={"name": recipe, "size": size, "pad": pad},
        shuffle_buffer=shuffle_buffer, image_field=image_field, label_field=label_field, resume=resume,
        top_k=top_k, class_map=class_map, labels=labels, eval_every=eval_every, online_teacher=online_teacher,
        online_teacher_checkpoint=online_teacher_checkpoint, online_teacher_pretrained=online_teacher_pretrained,
        pretrained=pretrained, student_size=student_size, log=log, sweep=sweep)
    reporter = ProgressReporter(quiet=quiet or json_, rank=_rank())
    try:
        with reporter.keeping_ctrl_c():
            summary = distill(cfg, reporter)
    except KeyboardInterrupt:
        reporter.distill_interrupted(out_)
        raise typer.Exit(code=130) from None
    if _rank() != 0:
        return
    if json_:
        out.print_json(data=summary)
        return
    best = summary["best_val_top1"]
    out.print(f"done: {summary['loss']} -> {summary['student']} | "
              + (f"best val top-1 {best:.2f}% (epoch {summary['best_epoch']}), last {summary['last_val_top1']:.2f}% | "
                 if best is not None else "")
              + f"train {summary['train_seconds']:.1f}s, total {summary['seconds']:.1f}s | {summary['out']}")


@app.command("demo", cls=PldCommand)
@friendly_errors
def demo_cmd(
    out_: Annotated[str, typer.Option("--out", help="Directory for the demo's data, cache, runs and results.")] = "pld-demo",
    quick: Annotated[bool, typer.Option(help="A seconds-long smoke run (tiny epochs), for tests.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda.")] = "auto",
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
) -> None:
    """The whole pipeline on real bundled data (scikit-learn's handwritten digits, no download).

    Writes shards, trains a teacher with --loss ce on all training images, caches its logits on a labelled
    subset of 200 with several views, distills the same student on that subset with CE, KD and PLD from the
    cache (3 seeds each) and once with the teacher run online (the cost side), then prints a results table and
    saves a plot.
    """
    from pld_pipeline.demo import DemoConfig, run_demo

    reporter = ProgressReporter(quiet=quiet)

    def stage(event: dict[str, Any]) -> None:
        if not quiet:
            err.print(f"[bold cyan]== {event['stage']}[/]: {event['detail']}")

    results = run_demo(DemoConfig(out=out_, quick=quick, device=device), reporter, stage)
    from pld_pipeline.demo import TABLE_COLUMNS, table_rows
    st = results["setting"]
    t = Table(title=f"pld demo: digits (1,797 real 8x8 handwritten digits, upscaled to 16x16); the teacher learned "
                    f"from all {st['train_images']:,} training images, the students from {st['labelled']} labelled "
                    f"ones and the cached teacher; {st['val_images']} validation images", caption=results["caption"])
    for col in TABLE_COLUMNS:
        t.add_column(col)
    for row in table_rows(results):
        t.add_row(*row)
    _print_table(t)
    c = results["cache"]
    out.print(f"cache: {c['url']} ({c['bytes'] / 1024:.1f} KiB, {c['bytes_per_view']:.1f} bytes per view, "
              f"{c['views']} views per sample); plot: {results['plot']}; table: {os.path.join(out_, 'results.md')}",
              soft_wrap=True)
    out.print("\nThe same on your own data:")
    for line in results["commands"]:
        out.print(f"  {line}", highlight=False, soft_wrap=True)


@app.command("make-shards", cls=PldCommand)
@friendly_errors
def make_shards_cmd(
    source: Annotated[str, typer.Argument(help="digits (bundled with scikit-learn), cifar (python pickle batches) or folder (ImageFolder tree).")],
    path: Annotated[Optional[Path], typer.Argument(help="cifar: the cifar-10-batches-py / cifar-100-python folder; folder: the root of CLASS/IMAGE files.")] = None,
    out_: Annotated[Path, typer.Option("--out", help="Output directory for the shards and classes.json.")] = Path("shards"),
    shard_size: Annotated[int, typer.Option(help="Samples per shard.")] = 1000,
    val_fraction: Annotated[float, typer.Option(help="Fraction held out as val (digits, folder; CIFAR uses its test split).")] = 0.1,
    seed: Annotated[int, typer.Option(help="Shuffle seed (samples are shuffled before sharding).")] = 0,
    upscale: Annotated[int, typer.Option(help="digits: integer upscale of the 8x8 images.")] = 2,
    overwrite: Annotated[bool, typer.Option(help="Replace classes.json and train/val shards already in --out.")] = False,
) -> None:
    """Write webdataset shards (unique dot-free keys, `cls` labels, classes.json) and print the patterns to use."""
    from pld_pipeline import shards as S

    if shard_size < 1 or not 0 <= val_fraction < 1:
        raise ValueError(f"--shard-size must be >= 1 and --val-fraction in [0, 1), got {shard_size} and {val_fraction}.")
    if source not in ("digits", "cifar", "folder"):
        raise ValueError(f"Unsupported source '{source}'. Use one of: digits, cifar, folder.")
    S.refuse_existing(str(out_), overwrite=overwrite)
    if source == "digits":
        images, labels, names = S.digits_arrays(upscale=upscale)
        splits = S.split_arrays(images, labels, names, str(out_), val_fraction=val_fraction, shard_size=shard_size, seed=seed)
    elif source in ("cifar", "folder"):
        if path is None or not path.is_dir():
            raise FileNotFoundError(f"make-shards {source} needs PATH, an existing directory (got {path}).")
        if source == "cifar":
            splits = {}
            for split, name in (("train", "train"), ("test", "val")):
                images, labels, names = S.cifar_arrays(str(path), split)
                order = __import__("numpy").random.default_rng(seed).permutation(len(images))
                gen = ((f"{name}_{S._safe(names[int(labels[i])])}_{int(i):06d}", S.encode_png(images[i]), "png", int(labels[i]))
                       for i in order)
                splits[name] = S.write_split(gen, str(out_), name, shard_size)
            S.write_classes(str(out_), names)
        else:
            paths, labels, names, links = S.image_folder(str(path))
            splits = S.split_files(paths, labels, names, str(out_), val_fraction=val_fraction, shard_size=shard_size, seed=seed)
            skipped = sum(split.skipped for split in splits.values())
            if links or skipped:
                out.print(f"skipped: {links} link(s) (never followed out of {path}), {skipped} file(s) that are not "
                          "images", highlight=False, soft_wrap=True)
    else:
        raise ValueError(f"Unsupported source '{source}'. Use one of: digits, cifar, folder.")
    for split in splits.values():
        out.print(f"{split.name}: {split.samples} samples in {len(split.shards)} shard(s): {split.pattern}",
                  highlight=False, soft_wrap=True)
    out.print(f"classes: {os.path.join(str(out_), 'classes.json')}", highlight=False, soft_wrap=True)


@app.command("sweep", cls=PldCommand)
@friendly_errors
def sweep_cmd(
    config: Annotated[Optional[Path], typer.Argument(help="TOML/YAML sweep file with [base], [grid] and/or [[runs]].")] = None,
    out_: Annotated[str, typer.Option("--out", help="Sweep directory: one distill run directory per configuration.")] = "sweep",
    grid: Annotated[Optional[list[str]], typer.Option(help="Grid, e.g. 'loss=pld,kd lr=1e-3,3e-3 seed=0,1,2' (repeatable).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Base setting for every run, e.g. epochs=20 (repeatable).")] = None,
    data: Annotated[Optional[str], typer.Option(help="Training shards (base setting).")] = None,
    cache: Annotated[Optional[str], typer.Option(help="Teacher cache (base setting), opened read-only by every run.")] = None,
    val_data: Annotated[Optional[str], typer.Option(help="Validation shards (base setting).")] = None,
    student: Annotated[Optional[str], typer.Option(help="Student (base setting).")] = None,
    cache_dir: Annotated[Optional[str], typer.Option(help="Local block cache for a remote --cache, shared by all runs.")] = None,
    expect_digest: Annotated[Optional[str], typer.Option(help="Refuse the cache unless its digest is this sha256:HEX (published beside a shared cache; `pld inspect` prints it), before anything is trained or written. Every run (and every printed command) carries it.")] = None,
    class_map: Annotated[Optional[str], typer.Option(help="Class map (base setting): JSON list, one entry per student class, of the cached teacher's class(es) it covers (see `pld distill --help`).")] = None,
    labels: Annotated[Optional[str], typer.Option(help="Under --class-map (base setting): teacher or student, the classes the shards' labels are in (see `pld distill --help`).")] = None,
    log: Annotated[Optional[str], typer.Option(help=LOG_HELP + " A sweep is one parent run (MLflow) or group (W&B) with a child run per configuration.")] = None,
    jobs: Annotated[int, typer.Option(help="Local launcher: runs at once (CPU threads split between them; one GPU each where several exist).", rich_help_panel=LAUNCH)] = 1,
    launcher: Annotated[str, typer.Option(help="local (this machine) or ray (a Ray cluster; pip install 'pld-pipeline[ray]').", rich_help_panel=LAUNCH)] = "local",
    ray_address: Annotated[Optional[str], typer.Option(help="Ray cluster to join: auto (this node's), host:port, or ray://host:10001 [default: start Ray here]. The sweep directory and local paths must be visible to every node.", rich_help_panel=LAUNCH)] = None,
    cpus_per_run: Annotated[float, typer.Option(help="Ray: CPUs reserved for each run (its torch threads).", rich_help_panel=LAUNCH)] = 1.0,
    gpus_per_run: Annotated[float, typer.Option(help="Ray: GPUs reserved for each run.", rich_help_panel=LAUNCH)] = 0.0,
    procs_per_run: Annotated[int, typer.Option(help="Ray: processes per run; > 1 makes each run a DDP run under torchrun (give one GPU per process).", rich_help_panel=LAUNCH)] = 1,
    print_commands: Annotated[bool, typer.Option("--print-commands", help="Print one `pld distill` line per pending run (for SLURM job arrays, Kubernetes job lists) and exit; `pld report` gathers the results.", rich_help_panel=LAUNCH)] = False,
    scheduler: Annotated[str, typer.Option(help="none (every run to its last epoch) or halving (asynchronous successive halving, Optuna's pruner: stops runs not in the top 1/--reduction-factor at each rung).", rich_help_panel=HALVING)] = "none",
    grace_epochs: Annotated[int, typer.Option(help="halving: epochs every run trains before it can be stopped (the first rung).", rich_help_panel=HALVING)] = 1,
    reduction_factor: Annotated[int, typer.Option(help="halving: keep the top 1/N at each rung; rungs at grace * N^i epochs (4: Optuna's and Ray Tune's default).", rich_help_panel=HALVING)] = 4,
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
) -> None:
    """Train many students from one cache: a grid or list of ordinary `distill` runs, then a results table.

    Finished runs are skipped on rerun and interrupted ones resume, on any launcher. Writes results.csv,
    results.md and results.png into --out (`pld report` re-renders them).
    """
    from pld_pipeline.halving import SCHEDULERS, HalvingRule
    from pld_pipeline.launch import Launch
    from pld_pipeline.sweep import load_sweep_file, parse_grid, parse_settings, pending_commands, run_sweep

    base, file_grid, runs = load_sweep_file(str(config)) if config else ({}, {}, [])
    base.update(parse_settings(set_ or []))
    base.update({k: v for k, v in dict(data=data, cache=cache, val_data=val_data, student=student,
                                         cache_dir=cache_dir, expect_digest=expect_digest, class_map=class_map,
                                         labels=labels, log=log).items()
                 if v is not None})
    full_grid = {**file_grid, **parse_grid(grid or [])}
    for loss in [base.get("loss", "pld"), *full_grid.get("loss", []), *(r.get("loss", "pld") for r in runs)]:
        options.check_loss_name(loss)  # before sweep.json is written or a run imports torch
    if scheduler not in SCHEDULERS:
        raise ValueError(f"Unknown --scheduler '{scheduler}'. Use one of: {', '.join(SCHEDULERS)}.")
    halving = HalvingRule(grace_epochs, reduction_factor) if scheduler == "halving" else None
    if print_commands:
        for line in pending_commands(base, full_grid, runs, out_, halving):
            print(line)
        return
    how = Launch(launcher, jobs=jobs, address=ray_address, cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run,
                 procs_per_run=procs_per_run)
    reporter = ProgressReporter(quiet=quiet)

    def progress(event: dict[str, Any]) -> None:
        if not quiet and event["event"] == "sweep_start":
            at_once = f"{event['jobs']} at once" if isinstance(event["jobs"], int) else f"on {event['jobs']}"
            err.print(f"sweep: {event['runs']} run(s), {event['runs'] - event['todo']} already done, {at_once}")
        elif not quiet and event["event"] == "run_done" and not reporter.live:
            err.print(f"finished {event['name']}")
        reporter(event)

    try:
        rows = run_sweep(base, full_grid, runs, out_, launch=how, halving=halving, progress=progress)
    finally:
        reporter.stop()
    _print_report(out_, rows)


@app.command("report", cls=PldCommand)
@friendly_errors
def report_cmd(sweep_dir: Annotated[str, typer.Argument(help="A directory made by `pld sweep`.")]) -> None:
    """Re-render a sweep's results.csv, results.md and results.png from its run directories."""
    from pld_pipeline.sweep import report
    _print_report(sweep_dir, report(sweep_dir))


def _print_report(sweep_dir: str, rows: list[dict[str, Any]]) -> None:
    from pld_pipeline.sweep import best_line, run_status
    t = Table(title=f"sweep {escape(sweep_dir)}")
    keys = [k for k in rows[0] if k not in ("run", "done", "epochs_done", "best_val_top1", "last_val_top1",
                                            "train_seconds", "stopped_after_epochs", "stop_reason")]
    for col in keys + ["best top-1", "last top-1", "train s", "status"]:
        t.add_column(escape(col))
    for r in rows:
        fmt = lambda v: "-" if v is None or v != v else f"{v:.2f}"  # noqa: E731
        t.add_row(*["-" if r[k] is None else escape(str(r[k])) for k in keys], fmt(r["best_val_top1"]),
                  fmt(r["last_val_top1"]), "-" if r["train_seconds"] is None else f"{r['train_seconds']:.1f}",
                  run_status(r))
    _print_table(t)  # off a terminal at its natural width: a status or setting is never wrapped mid-word
    out.print(best_line(rows), highlight=False, soft_wrap=True)
    out.print(f"results: {os.path.join(sweep_dir, 'results.md')}, {os.path.join(sweep_dir, 'results.csv')}, "
              f"{os.path.join(sweep_dir, 'results.png')}")


_PATTERN_OPTIONS = ("--data", "--val-data")


def shell_expanded_pattern(argv: list[str]) -> Optional[str]:
    """What to say when the shell expanded an unquoted brace pattern (``--data train-{0..9}.tar`` arrives as
    ``--data train-0.tar train-1.tar ...``): click would only report an "unexpected extra argument"."""
    for i, tok in enumerate(argv[:-2]):
        if tok not in _PATTERN_OPTIONS:
            continue
        value, rest = argv[i + 1], argv[i + 2:]
        siblings = 0
        for extra in rest:
            if extra.startswith("-") or (os.path.dirname(extra), os.path.splitext(extra)[1]) != (
                    os.path.dirname(value), os.path.splitext(value)[1]):
                break
            siblings += 1
        if siblings:
            return (f"{tok} {value} is followed by {siblings} more file name(s) ({rest[0]}, ...): the shell expanded "
                    f"an unquoted brace pattern into {siblings + 1} words. Quote the pattern so pld expands it: "
                    f"{tok} 'train-{{000000..000009}}.tar'.")
    return None


def main() -> None:
    import sys
    hint = shell_expanded_pattern(sys.argv[1:])
    if hint is not None:
        err.print(f"[bold red]error:[/] {escape(hint)}", highlight=False, soft_wrap=True)
        raise SystemExit(2)
    app(prog_name="pld")


if __name__ == "__main__":
    main()
