"""Writing webdataset shards from images in memory, an ImageFolder tree, CIFAR pickles or sklearn's digits."""
from __future__ import annotations

import io
import json
import os
import pickle
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import webdataset as wds
from PIL import Image

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass
class Split:
    """Where one split's shards went and how to name them on the command line."""
    name: str
    pattern: str
    shards: list[str]
    samples: int


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def write_split(samples: Iterable[tuple[str, bytes, str, int]], out_dir: str, prefix: str, shard_size: int) -> Split:
    """Write ``(key, image_bytes, ext, label)`` samples as ``{prefix}-{i:06d}.tar`` shards of ``shard_size``."""
    os.makedirs(out_dir, exist_ok=True)
    shards: list[str] = []
    count = 0
    writer = None
    for key, data, ext, label in samples:
        if "." in key or "/" in key:
            raise ValueError(f"Key {key!r} must not contain '.' or '/': webdataset keys end at the first dot.")
        if count % shard_size == 0:
            if writer is not None:
                writer.close()
            path = os.path.join(out_dir, f"{prefix}-{len(shards):06d}.tar")
            shards.append(path)
            writer = wds.TarWriter(path)
        writer.write({"__key__": key, ext: data, "cls": str(int(label)).encode()})
        count += 1
    if writer is not None:
        writer.close()
    if not shards:
        raise ValueError(f"No samples to write for split '{prefix}'.")
    last = len(shards) - 1
    pattern = os.path.join(out_dir, f"{prefix}-{{000000..{last:06d}}}.tar") if last else shards[0]
    return Split(prefix, pattern, shards, count)


def write_classes(out_dir: str, class_names: list[str]) -> str:
    path = os.path.join(out_dir, "classes.json")
    with open(path, "w") as f:
        json.dump({"class_names": class_names}, f, indent=1)
    return path


def read_classes(shard_url: str) -> list[str] | None:
    """The ``classes.json`` that make-shards writes beside the shards, if there is one (local paths only)."""
    path = os.path.join(os.path.dirname(shard_url), "classes.json")
    if "://" in shard_url or not os.path.isfile(path):
        return None
    with open(path) as f:
        return list(json.load(f)["class_names"])


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


def cifar_arrays(root: str, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """CIFAR-10/100 python pickle batches (the official ``cifar-10-batches-py`` / ``cifar-100-python``)."""
    def load(name: str) -> dict:
        with open(os.path.join(root, name), "rb") as f:
            return pickle.load(f, encoding="latin1")

    if os.path.isfile(os.path.join(root, "batches.meta")):
        names = load("batches.meta")["label_names"]
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        key = "labels"
    elif os.path.isfile(os.path.join(root, "meta")):
        names = load("meta")["fine_label_names"]
        files = ["train" if split == "train" else "test"]
        key = "fine_labels"
    else:
        raise FileNotFoundError(f"{root} holds neither CIFAR-10 (batches.meta) nor CIFAR-100 (meta) pickles.")
    batches = [load(f) for f in files]
    data = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = np.concatenate([np.asarray(b[key]) for b in batches])
    return np.ascontiguousarray(data), labels, list(names)


def image_folder(root: str) -> tuple[list[str], np.ndarray, list[str]]:
    """An ImageFolder tree (one sub-folder per class): file paths, labels, class names (sorted folders)."""
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise FileNotFoundError(f"{root} has no class sub-folders; expected ROOT/CLASS/IMAGE files.")
    paths, labels = [], []
    for c, name in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(os.path.join(root, name))):
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTS):
                    paths.append(os.path.join(dirpath, f))
                    labels.append(c)
    if not paths:
        raise FileNotFoundError(f"No images ({', '.join(IMAGE_EXTS)}) under {root}.")
    return paths, np.asarray(labels), classes


def split_files(paths: list[str], labels: np.ndarray, class_names: list[str], out_dir: str, *, val_fraction: float,
                shard_size: int, seed: int) -> dict[str, Split]:
    """Like :func:`split_arrays`, keeping each file's encoded bytes as they are (no re-encoding)."""
    order = _shuffled(len(paths), seed)
    n_val = int(round(len(paths) * val_fraction))
    out = {}
    for split, idx in {"val": order[:n_val], "train": order[n_val:]}.items():
        if len(idx) == 0:
            continue

        def gen(idx: np.ndarray = idx, split: str = split) -> Iterator[tuple[str, bytes, str, int]]:
            for i in idx:
                ext = os.path.splitext(paths[i])[1].lower().lstrip(".")
                ext = "jpg" if ext == "jpeg" else ext
                with open(paths[i], "rb") as f:
                    data = f.read()
                yield f"{split}_{_safe(class_names[int(labels[i])])}_{int(i):07d}", data, ext, int(labels[i])

        out[split] = write_split(gen(), out_dir, split, shard_size)
    write_classes(out_dir, class_names)
    return out
