"""Option checks that need neither torch nor zarr, so a mistake is refused in well under a second.

torch, timm and webdataset take seconds to import, and indexing shards or loading a model takes longer: the
command line runs these checks first. Each repeats a rule the library enforces again later (a library caller
gets the same refusal, later), in the library's words. Only what is cheap is checked: local files (a remote
shard or cache is left to the library), the cache's root ``zarr.json`` read as plain JSON, names.
"""
from __future__ import annotations

import difflib
import functools
import hashlib
import importlib.util
import json
import os
import re
from typing import IO, Any, Iterable, Sequence

import braceexpand

from .errors import PldError
from .loss_names import BUILTIN_LOSSES

QUICK_BYTES = 1 << 20  # quick_hash: bytes hashed at each end of a shard
DIGEST_FORM = re.compile(r"^sha256:[0-9a-f]{64}$")
#: A root metadata document larger than this is not read here (the library reads it with its own limits).
MAX_ROOT_BYTES = 64 << 20
_REMOTE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_TIMM_SCHEMES = ("hf-hub:", "local-dir:")
RECIPES = ("cifar", "imagenet", "none")  # views.ViewRecipe names


class OptionError(PldError):
    """An option that cannot work as given, found before anything was imported, read or written."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or ''."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def parse_digest(text: str, what: str = "--expect-digest") -> str:
    """A digest as given by a user, checked for form (lower-case hex, as pld prints it)."""
    digest = str(text).strip().lower()
    if not DIGEST_FORM.match(digest):
        raise ValueError(f"{what} {text!r} is not a cache digest; it looks like sha256: followed by 64 hex "
                         "digits, as `pld inspect` and `pld cache-teacher` print it.")
    return digest


def local_path(url: str) -> str | None:
    """The file system path of a local path or ``file://`` URL; None for remote URLs and ``pipe:`` commands."""
    if url.startswith("file://"):
        return url[len("file://"):]
    if url.startswith("pipe:") or _REMOTE.match(url):
        return None
    return url


def require_module(module: str, what: str, extra: str) -> None:
    """An optional dependency an option needs, found (not imported) before anything is written; else one line
    naming the extra that installs it."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise OptionError(f"{what} needs the optional package {module}, which is not installed: "
                          f"pip install \"pld-pipeline[{extra}]\" (nothing was written).")


def check_loss_name(loss: Any) -> None:
    """A built-in loss name (the command line knows no other)."""
    if loss not in BUILTIN_LOSSES:
        raise OptionError(f"Unsupported loss '{loss}'{did_you_mean(str(loss), BUILTIN_LOSSES)}. Use one of: "
                          f"{', '.join(BUILTIN_LOSSES)}.")


def check_loss(loss: str, cache: str | None, online_teacher: str | None = None) -> None:
    """A built-in loss name, and a cache for every loss that learns from a teacher."""
    check_loss_name(loss)
    info = BUILTIN_LOSSES[loss]
    if info.needs_teacher and not cache and not online_teacher:
        raise OptionError(f"--loss {loss} needs --cache (teacher targets); only --loss ce trains without one.")


def check_model_source(source: str, what: str) -> None:
    """A ``module.path:factory`` whose module exists, or a timm model name timm registers: both found without
    importing anything (models.load_model refuses them again, with timm's own registry)."""
    if source.startswith(_TIMM_SCHEMES):
        return
    if ":" not in source:
        check_model_name(source, what)
        return
    module, _, attr = source.partition(":")
    try:
        found = bool(module) and importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found or not attr.isidentifier():
        raise OptionError(f"{what} {source!r}: no module {module!r} to import a factory from; give a timm model "
                          "name or module.path:factory with the module on PYTHONPATH.")


_REGISTERED = re.compile(r"@register_model(?:\([^)]*\))?\s*\ndef\s+(\w+)")
_DEPRECATIONS = re.compile(r"register_model_deprecations\(__name__,\s*\{(.*?)\}\)", re.S)
_DEPRECATED_NAME = re.compile(r"['\"](\w+)['\"]\s*:")


@functools.lru_cache(maxsize=1)
def registered_model_names() -> frozenset[str]:
    """Every model name ``timm.create_model`` accepts without a scheme (timm's and this project's, deprecated
    aliases included), read from their sources: importing timm takes seconds, reading ~4 MB of text a tenth of
    one. Empty when the sources cannot be read (an unusual install): callers then leave the check to timm."""
    files = []
    for package, sub in (("timm", "models"), ("pld_pipeline", "")):
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            return frozenset()
        if spec is None or not spec.origin:
            return frozenset()
        folder = os.path.join(os.path.dirname(spec.origin), sub)
        try:
            files += [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(".py")]
        except OSError:  # not a folder of sources (a zipped install)
            return frozenset()
    names: set[str] = set()
    for path in files:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            return frozenset()
        names.update(_REGISTERED.findall(text))
        for block in _DEPRECATIONS.findall(text):
            names.update(_DEPRECATED_NAME.findall(block))
    return frozenset(names) if len(names) > 100 else frozenset()  # a handful means the layout changed


def check_model_name(name: str, what: str) -> None:
    """A plain model name (``resnet50``, ``resnet50.a1_in1k``, ``cifar_resnet56``) that timm registers; an unknown
    one is refused with the closest names, this project's CIFAR ResNets first (``resnet56`` is one here)."""
    known = registered_model_names()
    arch = name.split(".")[0]
    if not known or arch in known:
        return
    ours = sorted(n for n in known if n.startswith("cifar_") and n.endswith(arch))
    close = difflib.get_close_matches(arch, sorted(known), n=3, cutoff=0.75)
    shown = list(dict.fromkeys(ours + close))[:3]
    hint = f" (did you mean {' or '.join(repr(n) for n in shown)}?)" if shown else ""
    raise OptionError(f"{what} {name!r} is not a timm model name{hint}; see timm.list_models(), or give "
                      "hf-hub:owner/name or module.path:factory.")


def shard_urls(spec: str, what: str = "--data") -> list[str]:
    """The shards a ``--data`` pattern names (brace ranges, ``::`` lists); refuses local ones that do not exist.
    Patterns with ``${VAR}`` (webdataset's environment substitution) are left to the library."""
    urls = [u for part in spec.split("::") for u in braceexpand.braceexpand(part)]
    if not urls or not all(urls):
        raise OptionError(f"No shards in {spec!r}; pass a path, URL or brace pattern like "
                          "'train-{000000..000009}.tar'.")
    if "${" in spec:
        return urls
    missing = [u for u in urls if (p := local_path(u)) is not None and not os.path.isfile(p)]
    if missing and len(missing) == len(urls):
        folder = os.path.dirname(local_path(missing[0]) or "") or "."
        where = "" if os.path.isdir(folder) else f"; the folder {folder} does not exist either"
        raise OptionError(f"{what} {spec!r} matches no file ({missing[0]} does not exist{where}); check the path "
                          "and the brace range, e.g. 'train-{000000..000009}.tar' (quoted).")
    if missing:
        raise OptionError(f"{what} {spec!r}: {len(missing)} of its {len(urls)} shards do not exist, e.g. "
                          f"{missing[0]}; check the brace range.")
    return urls


def cache_root(url: str) -> dict[str, Any] | None:
    """A local cache's root metadata (the ``pld_cache`` attribute of its ``zarr.json``) as plain JSON; None for a
    remote cache, or one whose root the library should explain (missing, malformed, still being created)."""
    path = local_path(url)
    if path is None:
        return None
    doc_path = os.path.join(path, "zarr.json")
    try:
        if os.path.getsize(doc_path) > MAX_ROOT_BYTES:
            return None
        with open(doc_path, "rb") as f:
            doc = json.loads(f.read())
    except (OSError, ValueError, RecursionError):
        return None
    attrs = doc.get("attributes") if isinstance(doc, dict) else None
    meta = attrs.get("pld_cache") if isinstance(attrs, dict) else None
    return meta if isinstance(meta, dict) and isinstance(meta.get("teachers"), dict) else None


def check_cached_teachers(meta: dict[str, Any], url: str, teacher: str | None, temperature: float | None) -> None:
    """The cached teacher(s) ``teacher`` names ('a,b': an ensemble) exist and hold ``temperature`` in their grid."""
    teachers = meta["teachers"]
    if not teachers:
        raise OptionError(f"{url} holds no teacher yet; run `pld cache-teacher` into it.")
    if teacher is None and len(teachers) > 1:
        raise OptionError(f"{url} holds several teachers ({', '.join(teachers)}); pick one with --teacher.")
    ids = [t.strip() for t in teacher.split(",")] if teacher else list(teachers)
    for tid in ids:
        if tid not in teachers:
            raise OptionError(f"Teacher '{tid}' is not in {url}{did_you_mean(tid, teachers)}; it holds: "
                              f"{', '.join(teachers)}.")
        grid = teachers[tid].get("temperatures") if isinstance(teachers[tid], dict) else None
        if temperature is None or not isinstance(grid, list):
            continue
        if not any(isinstance(t, (int, float)) and abs(t - temperature) < 1e-9 for t in grid):
            shown = ", ".join(f"{t:g}" for t in grid if isinstance(t, (int, float)))
            raise OptionError(f"Temperature {temperature:g} is not in teacher '{tid}''s cached grid ({shown}); "
                              f"use one of those, or re-cache with --temperatures including {temperature:g}.")


def check_shards_cached(meta: dict[str, Any], url: str, shards: Sequence[str]) -> None:
    """Every local training shard is one the cache covers: by name, else by quick hash (a renamed copy); the
    library then matches each by content."""
    records = [s for s in meta.get("shards", []) if isinstance(s, dict)]
    names = {s.get("name") for s in records}
    hashes = None
    for shard in shards:
        path = local_path(shard)
        if path is None or os.path.basename(path) in names:
            continue
        if hashes is None:
            hashes = {s.get("quick_hash") for s in records}
        with open(path, "rb") as f:
            found = quick_hash(f) in hashes
        if not found:
            raise OptionError(f"Training shard {shard} is not one the cache {url} covers (by name or content hash); "
                              "train on the cached shards (a subset is fine) or cache these first.")


def quick_hash(f: IO[bytes]) -> str:
    """sha256 over (size, first MiB, last MiB) of a seekable file, as docs/cache-format.md defines ``quick_hash``."""
    size = f.seek(0, 2)
    f.seek(0)
    head = f.read(QUICK_BYTES)
    f.seek(max(0, size - QUICK_BYTES))
    tail = f.read(QUICK_BYTES)
    h = hashlib.sha256(str(size).encode() + b"\0")
    h.update(head)
    h.update(tail)
    return h.hexdigest()


def check_distill(*, data: str, student: str, loss: str, cache: str | None = None, val_data: str | None = None,
                  teacher: str | None = None, temperature: float | None = None, expect_digest: str | None = None,
                  class_map: str | None = None, num_classes: int | None = None, online_teacher: str | None = None,
                  init_checkpoint: str | None = None) -> None:
    """What `pld distill` can refuse before importing torch (distill.distill and StudentData refuse it again)."""
    check_loss(loss, cache, online_teacher)
    if temperature is not None and not temperature > 0:
        raise OptionError(f"--temperature must be positive, got {temperature:g}.")
    if expect_digest is not None:
        if not cache:
            raise OptionError("--expect-digest pins a teacher cache; give the cache with --cache.")
        parse_digest(expect_digest)
    if class_map is not None and not cache:
        raise OptionError("--class-map maps a cached teacher's classes to the student's; it needs --cache.")
    check_model_source(student, "--student")
    if online_teacher:
        check_model_source(online_teacher, "--online-teacher")
    if init_checkpoint and local_path(init_checkpoint) is not None and not os.path.isfile(init_checkpoint):
        raise OptionError(f"--init-checkpoint {init_checkpoint} does not exist.")
    shards = shard_urls(data, "--data")
    if val_data:
        shard_urls(val_data, "--val-data")
    if not cache:
        return
    path = local_path(cache)
    if path is not None and not os.path.isdir(path):
        raise OptionError(f"No cache at {cache}: run `pld cache-teacher --out {cache} ...` first.")
    meta = cache_root(cache)
    if meta is None:
        return  # remote, or a root the library explains
    if BUILTIN_LOSSES[loss].needs_teacher and not online_teacher:
        check_cached_teachers(meta, cache, teacher, BUILTIN_LOSSES[loss].temperature if temperature is None
                              else temperature)
    check_shards_cached(meta, cache, shards)
    student_classes = meta.get("num_classes")
    if class_map is not None and isinstance(student_classes, int):
        from .class_map_spec import load_class_map
        names = meta.get("class_names")
        student_classes = load_class_map(class_map, student_classes, names if isinstance(names, list) else None).num_classes
    if num_classes is not None and isinstance(student_classes, int) and num_classes != student_classes:
        whose = "class map's" if class_map is not None else "cache's"
        raise OptionError(f"--num-classes {num_classes} differs from the {whose} {student_classes} classes.")


def check_cache_teacher(*, data: str, teachers: Sequence[str], checkpoints: Sequence[str] = (),
                        names: Sequence[str] = (), class_names: str | None = None,
                        temperatures: Sequence[float] = (1.0,), top_k: int | None = None, views: int = 1,
                        recipe: str = "cifar", save_rows: int | None = None,
                        save_seconds: float = 60.0) -> None:
    """What `pld cache-teacher` can refuse before importing torch (cache_teacher refuses it again, later)."""
    if (save_rows is not None and save_rows < 1) or not save_seconds > 0:
        raise OptionError(f"--save-rows must be >= 1 and --save-seconds > 0, got {save_rows} and {save_seconds:g}.")
    if not temperatures or any(not t > 0 for t in temperatures):
        raise OptionError(f"--temperatures must be positive numbers, got {', '.join(f'{t:g}' for t in temperatures)}.")
    if top_k is not None and top_k < 1:
        raise OptionError(f"--top-k must be >= 1, got {top_k}.")
    if views < 1:
        raise OptionError(f"--views must be >= 1, got {views}.")
    if recipe not in RECIPES:
        raise OptionError(f"Unsupported --recipe '{recipe}'{did_you_mean(recipe, RECIPES)}. Use one of: "
                          f"{', '.join(RECIPES)}.")
    if checkpoints and len(checkpoints) != len(teachers):
        raise OptionError(f"Got {len(teachers)} --teacher but {len(checkpoints)} --teacher-checkpoint; give one per "
                          "teacher.")
    if names and len(names) != len(teachers):
        raise OptionError(f"Got {len(teachers)} --teacher but {len(names)} --teacher-name; give one per teacher.")
    for ckpt in checkpoints:
        if ckpt and local_path(ckpt) is not None and not os.path.isfile(ckpt):
            raise OptionError(f"--teacher-checkpoint {ckpt} does not exist.")
    for source in teachers:
        check_model_source(source, "--teacher")
    shard_urls(data, "--data")
    if class_names is not None and not os.path.isfile(class_names):
        raise OptionError(f"--class-names {class_names} does not exist.")
