"""Writing webdataset shards from images in memory, an ImageFolder tree, CIFAR pickles or sklearn's digits."""
from __future__ import annotations

import codecs
import dataclasses
import io
import os
import pickle
import re
import secrets
from dataclasses import dataclass
from typing import IO, Any, Iterable, Iterator

import numpy as np
import webdataset as wds
from PIL import Image

from .data import DataError
from .files import json_field, read_bytes, read_json, refuse_link, write_json

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
#: The most bytes pld reads of one CIFAR pickle batch (the official ones are 31 MB; CIFAR-100 train 155 MB)
MAX_PICKLE_BYTES = 512 << 20


@dataclass
class Split:
    """Where one split's shards went and how to name them on the command line."""
    name: str
    pattern: str
    shards: list[str]
    samples: int
    skipped: int = 0  # files of an image folder that do not decode as images (skipped and counted)


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def write_split(samples: Iterable[tuple[str, bytes, str, int]], out_dir: str, prefix: str, shard_size: int) -> Split:
    """Write ``(key, image_bytes, ext, label)`` samples as ``{prefix}-{i:06d}.tar`` shards of ``shard_size``."""
    os.makedirs(out_dir, exist_ok=True)
    shards: list[str] = []
    count = 0
    writer, tmp = None, ""

    def finish() -> None:  # a TarWriter given a file object leaves it open; then the shard takes its name
        writer.close()
        writer.stream.close()
        os.replace(tmp, shards[-1])

    for key, data, ext, label in samples:
        if "." in key or "/" in key:
            raise ValueError(f"Key {key!r} must not contain '.' or '/': webdataset keys end at the first dot.")
        if count % shard_size == 0:
            if writer is not None:
                finish()
            path = os.path.join(out_dir, f"{prefix}-{len(shards):06d}.tar")
            shards.append(path)
            tmp, stream = _open_new(path)
            writer = wds.TarWriter(stream)
        writer.write({"__key__": key, ext: data, "cls": str(int(label)).encode()})
        count += 1
    if writer is not None:
        finish()
    if not shards:
        raise ValueError(f"No samples to write for split '{prefix}'.")
    last = len(shards) - 1
    pattern = os.path.join(out_dir, f"{prefix}-{{000000..{last:06d}}}.tar") if last else shards[0]
    return Split(prefix, pattern, shards, count)


def _open_new(path: str) -> tuple[str, IO[bytes]]:
    """A fresh temporary file beside ``path`` (``O_EXCL | O_NOFOLLOW``) and its name, renamed over ``path`` once
    written: a symbolic or hard link planted at ``path`` in --out is replaced, never written through (truncating
    a hard link would rewrite the file it shares)."""
    refuse_link(path)
    tmp = f"{path}.{secrets.token_hex(4)}.tmp"
    return tmp, os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666),
                          "wb")


def write_classes(out_dir: str, class_names: list[str]) -> str:
    path = os.path.join(out_dir, "classes.json")
    write_json(path, {"class_names": class_names})
    return path


def refuse_existing(out_dir: str, prefixes: Iterable[str] = ("train", "val"), overwrite: bool = False) -> None:
    """make-shards writes classes.json and ``{prefix}-NNNNNN.tar``: refuse an --out that already holds any of
    them unless the user said --overwrite (they may be another dataset's, or the user's own)."""
    if overwrite or not os.path.isdir(out_dir):
        return
    names = os.listdir(out_dir)
    taken = sorted(n for n in names if n == "classes.json"
                   or any(re.fullmatch(rf"{re.escape(p)}-\d{{6}}\.tar", n) for p in prefixes))
    if taken:
        raise DataError(f"{out_dir} already holds {', '.join(taken[:4])}{', ...' if len(taken) > 4 else ''}; pass "
                        "--overwrite to replace them, or choose another --out.")


def read_classes(shard_url: str) -> list[str] | None:
    """The ``classes.json`` that make-shards writes beside the shards, if there is one (local paths only)."""
    path = os.path.join(os.path.dirname(shard_url), "classes.json")
    if "://" in shard_url or not os.path.isfile(path):
        return None
    names = json_field(read_json(path), path, "class_names", kind=list)
    if not all(isinstance(n, str) for n in names):
        raise DataError(f"{path}: field class_names invalid (not a list of strings); fix the file or pass --class-names.")
    return names


def _shuffled(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n)


def split_arrays(images: np.ndarray, labels: np.ndarray, class_names: list[str], out_dir: str, *, val_fraction: float,
                 shard_size: int, seed: int, prefix: str = "") -> dict[str, Split]:
    """Shuffle once, split train/val, write PNG shards and classes.json. Keys: ``{split}_{class}_{index}``."""
    order = _shuffled(len(images), seed)
    n_val = int(round(len(images) * val_fraction))
    splits = {"val": order[:n_val], "train": order[n_val:]}
    out = {}
    for split, idx in splits.items():
        if len(idx) == 0:
            continue

        def gen(idx: np.ndarray = idx, split: str = split) -> Iterator[tuple[str, bytes, str, int]]:
            for i in idx:
                name = _safe(class_names[int(labels[i])])
                yield f"{split}_{name}_{int(i):06d}", encode_png(images[i]), "png", int(labels[i])

        out[split] = write_split(gen(), out_dir, f"{prefix}{split}", shard_size)
    write_classes(out_dir, class_names)
    return out


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)


def digits_arrays(upscale: int = 2) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """scikit-learn's bundled handwritten digits (1,797 8x8 images, no download) as uint8 RGB."""
    from sklearn.datasets import load_digits
    d = load_digits()
    gray = np.clip(d.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    gray = gray.repeat(upscale, axis=1).repeat(upscale, axis=2)
    rgb = np.repeat(gray[..., None], 3, axis=3)
    return rgb, d.target.astype(np.int64), [str(i) for i in range(10)]


def _numpy_globals() -> dict[tuple[str, str], Any]:
    from numpy._core import multiarray, numeric
    return {("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
            ("numpy.core.numeric", "_frombuffer"): numeric._frombuffer,
            ("numpy._core.numeric", "_frombuffer"): numeric._frombuffer,
            ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
            # bytes in a protocol-2 pickle written by Python 3: _codecs.encode(text, "latin1") (a codec, no code)
            ("_codecs", "encode"): codecs.encode}


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR's official batches are pickles of dicts of numpy arrays, lists, strings and numbers: resolve only
    the globals that rebuild a numpy array (``_reconstruct``/``_frombuffer``, ``ndarray``, ``dtype``), so a
    pickle that names anything else (``os.system``, ``builtins.eval``) is refused before it runs."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _numpy_globals()
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refused to unpickle {module}.{name}: a CIFAR batch holds only numpy "
                                         "arrays, lists, dicts, strings and numbers; use the official "
                                         "cifar-10-batches-py or cifar-100-python folder.")
        return allowed[(module, name)]


def cifar_arrays(root: str, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """CIFAR-10/100 python pickle batches (the official ``cifar-10-batches-py`` / ``cifar-100-python``)."""
    def load(name: str) -> dict:
        path = os.path.join(root, name)
        with io.BytesIO(read_bytes(path, MAX_PICKLE_BYTES)) as f:  # a regular file of bounded size
            try:
                doc = _CifarUnpickler(f, encoding="latin1").load()
            except pickle.UnpicklingError as e:
                raise DataError(f"{path}: {e}") from None
            except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as e:
                raise DataError(f"{path}: not a CIFAR pickle ({type(e).__name__}: {e}); use the official "
                                "cifar-10-batches-py or cifar-100-python folder.") from None
        if not isinstance(doc, dict):
            raise DataError(f"{path}: not a CIFAR pickle (a {type(doc).__name__}, not a dict); use the official "
                            "cifar-10-batches-py or cifar-100-python folder.")
        return doc

    if os.path.isfile(os.path.join(root, "batches.meta")):
        names = load("batches.meta").get("label_names")
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        key = "labels"
    elif os.path.isfile(os.path.join(root, "meta")):
        names = load("meta").get("fine_label_names")
        files = ["train" if split == "train" else "test"]
        key = "fine_labels"
    else:
        raise FileNotFoundError(f"{root} holds neither CIFAR-10 (batches.meta) nor CIFAR-100 (meta) pickles.")
    batches = [load(f) for f in files]
    for f, b in zip(files, batches):
        data, labels = b.get("data"), b.get(key)
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072
                and isinstance(labels, (list, np.ndarray)) and len(labels) == len(data)):
            raise DataError(f"{os.path.join(root, f)}: not a CIFAR batch (needs 'data', uint8 [N, 3072], and "
                            f"'{key}', N labels); use the official cifar-10-batches-py or cifar-100-python folder.")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{root}: the class names in its meta file are not a list of strings.")
    data = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = np.concatenate([np.asarray(b[key]) for b in batches])
    if labels.dtype.kind not in "iu" or labels.size and not 0 <= labels.min() <= labels.max() < len(names):
        raise DataError(f"{root}: labels outside [0, {len(names)}) or not integers; the batches are damaged.")
    return np.ascontiguousarray(data), labels.astype(np.int64), list(names)


def image_folder(root: str) -> tuple[list[str], np.ndarray, list[str], int]:
    """An ImageFolder tree (one sub-folder per class): file paths, labels, class names (sorted folders), and how
    many links were skipped. Links are never followed out of the tree: a linked class folder, a linked folder
    inside one (os.walk's default) and a linked file are skipped and counted (one once packed /etc/passwd as a
    "jpg")."""
    links = 0
    classes = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.is_symlink():
            links += 1
        elif entry.is_dir(follow_symlinks=False):
            classes.append(entry.name)
    if not classes:
        raise FileNotFoundError(f"{root} has no class sub-folders; expected ROOT/CLASS/IMAGE files.")
    paths, labels = [], []
    for c, name in enumerate(classes):
        for dirpath, dirs, files in sorted(os.walk(os.path.join(root, name))):
            links += sum(os.path.islink(os.path.join(dirpath, d)) for d in dirs)
            for f in sorted(files):
                if not f.lower().endswith(IMAGE_EXTS):
                    continue
                if os.path.islink(os.path.join(dirpath, f)):
                    links += 1
                    continue
                paths.append(os.path.join(dirpath, f))
                labels.append(c)
    if not paths:
        raise FileNotFoundError(f"No images ({', '.join(IMAGE_EXTS)}) under {root}.")
    return paths, np.asarray(labels), classes, links


#: The most bytes of one image file ``make-shards folder`` packs (read through files.read_bytes)
MAX_IMAGE_FILE_BYTES = 64 << 20


def _image_or_none(path: str) -> bytes | None:
    """The file's bytes if it is a regular file (bounded, not a FIFO or device) that PIL identifies as an image
    within the pixel cap; None for anything else (counted as skipped)."""
    from .errors import MetadataError
    try:
        data = read_bytes(path, MAX_IMAGE_FILE_BYTES)
        with Image.open(io.BytesIO(data)) as img:
            cap = Image.MAX_IMAGE_PIXELS
            if cap is not None and img.width * img.height > cap:
                return None
    except (MetadataError, OSError, Image.DecompressionBombError, ValueError):
        return None
    return data


def split_files(paths: list[str], labels: np.ndarray, class_names: list[str], out_dir: str, *, val_fraction: float,
                shard_size: int, seed: int) -> dict[str, Split]:
    """Like :func:`split_arrays`, keeping each file's encoded bytes as they are (no re-encoding)."""
    order = _shuffled(len(paths), seed)
    n_val = int(round(len(paths) * val_fraction))
    out = {}
    for split, idx in {"val": order[:n_val], "train": order[n_val:]}.items():
        if len(idx) == 0:
            continue

        skipped = [0]

        def gen(idx: np.ndarray = idx, split: str = split) -> Iterator[tuple[str, bytes, str, int]]:
            for i in idx:
                ext = os.path.splitext(paths[i])[1].lower().lstrip(".")
                ext = "jpg" if ext == "jpeg" else ext
                data = _image_or_none(paths[i])
                if data is None:  # not an image (or not a regular file): skipped, counted
                    skipped[0] += 1
                    continue
                yield f"{split}_{_safe(class_names[int(labels[i])])}_{int(i):07d}", data, ext, int(labels[i])

        out[split] = dataclasses.replace(write_split(gen(), out_dir, split, shard_size), skipped=skipped[0])
    write_classes(out_dir, class_names)
    return out
