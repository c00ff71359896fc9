"""Augmented views: parameters drawn from a stable hash, stored, and replayed bit-for-bit.

A view is fully described by five integers in source-image pixels, ``(top, left, height, width, flip)``:
crop that box (zero padding where it leaves the image), resize it to ``size`` x ``size`` if it is not already,
flip horizontally if ``flip``. The random draw happens once (in ``cache-teacher``) and its *realised* values are
stored, so the student's replay does not depend on any RNG implementation: :func:`replay_view` on the same
decoded image gives the identical uint8 tensor the teacher saw.
"""
from __future__ import annotations

import functools
import hashlib
import io
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

RECIPES = ("cifar", "imagenet", "none")
_INTERPOLATIONS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
                   "nearest": InterpolationMode.NEAREST}


@dataclass(frozen=True)
class ViewRecipe:
    """How views are drawn. ``cifar``: pad-and-crop + flip; ``imagenet``: RandomResizedCrop + flip (timm
    conventions); ``none``: the eval transform only. ``clean_view`` makes view 0 the eval view."""
    name: str = "cifar"
    size: int = 32
    pad: int = 4
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    clean_view: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in RECIPES:
            raise ValueError(f"Unsupported view recipe '{self.name}'. Use one of: {', '.join(RECIPES)}.")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"Unsupported interpolation '{self.interpolation}'. Use one of: {', '.join(_INTERPOLATIONS)}.")
        if self.size < 1 or self.pad < 0 or not 0 < self.crop_pct <= 1:
            raise ValueError(f"Bad recipe sizes: size={self.size}, pad={self.pad}, crop_pct={self.crop_pct}.")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scale"], d["ratio"] = list(self.scale), list(self.ratio)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ViewRecipe":
        d = dict(d)
        d["scale"], d["ratio"] = tuple(d["scale"]), tuple(d["ratio"])
        return cls(**d)


def view_rng(seed: int, key: str, view: int) -> np.random.Generator:
    """A generator seeded from blake2b(seed, key, view): the same in every process, machine and run
    (Python's ``hash()`` is salted per process and must never be used for this)."""
    digest = hashlib.blake2b(f"{seed}\x00{key}\x00{view}".encode("utf-8"), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def stable_int(*parts: Any) -> int:
    digest = hashlib.blake2b("\x00".join(map(str, parts)).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def eval_params(recipe: ViewRecipe, height: int, width: int) -> np.ndarray:
    """The clean view as a box: ``cifar`` takes the centre ``size`` crop; ``imagenet``/``none`` follow timm's
    eval transform (shorter side to ``size / crop_pct``, centre crop ``size``) expressed in source pixels."""
    if recipe.name == "cifar":
        h = w = recipe.size
    else:
        side = min(height, width) * recipe.crop_pct
        h = w = max(1, int(round(side)))
    return np.array([(height - h) // 2, (width - w) // 2, h, w, 0], dtype=np.int32)


def _random_resized_crop(rng: np.random.Generator, recipe: ViewRecipe, height: int, width: int) -> tuple[int, ...]:
    """torchvision's RandomResizedCrop.get_params, drawn from ``rng``."""
    area = height * width
    log_ratio = (math.log(recipe.ratio[0]), math.log(recipe.ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(recipe.scale[0], recipe.scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height  # fallback: central crop at the nearest allowed ratio
    if in_ratio < min(recipe.ratio):
        w, h = width, int(round(width / min(recipe.ratio)))
    elif in_ratio > max(recipe.ratio):
        h, w = height, int(round(height * max(recipe.ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def view_params(recipe: ViewRecipe, seed: int, key: str, view: int, height: int, width: int) -> np.ndarray:
    """The realised parameters of view ``view`` of sample ``key``: int32 [top, left, height, width, flip]."""
    if recipe.name == "none" or (recipe.clean_view and view == 0):
        return eval_params(recipe, height, width)
    rng = view_rng(seed, key, view)
    if recipe.name == "cifar":
        if min(height, width) + 2 * recipe.pad < recipe.size:
            raise ValueError(f"The cifar recipe crops {recipe.size}x{recipe.size} from the image padded by {recipe.pad}, "
                             f"but sample {key!r} is {height}x{width}: use --recipe imagenet (it resizes) or a "
                             "smaller --size.")
        top = int(rng.integers(-recipe.pad, height - recipe.size + recipe.pad + 1))
        left = int(rng.integers(-recipe.pad, width - recipe.size + recipe.pad + 1))
        box = (top, left, recipe.size, recipe.size)
    else:
        box = _random_resized_crop(rng, recipe, height, width)
    flip = int(recipe.flip and rng.random() < 0.5)
    return np.array([*box, flip], dtype=np.int32)


def replay_view(image: torch.Tensor, params: np.ndarray | torch.Tensor | list[int], recipe: ViewRecipe) -> torch.Tensor:
    """The view's uint8 [3, size, size] tensor from a decoded uint8 [3, H, W] image and stored params.
    Deterministic CPU ops only, so teacher and student get identical bytes."""
    top, left, h, w, flip = (int(x) for x in params)
    out = TF.crop(image, top, left, h, w)  # pads with zeros where the box leaves the image
    if (h, w) != (recipe.size, recipe.size):
        out = TF.resize(out, [recipe.size, recipe.size], interpolation=_INTERPOLATIONS[recipe.interpolation],
                        antialias=True)
    if flip:
        out = TF.horizontal_flip(out)
    return out.contiguous()


def decode_image(data: bytes) -> torch.Tensor:
    """Encoded image bytes -> uint8 [3, H, W] RGB tensor (PIL; the same decoder on both sides)."""
    with Image.open(io.BytesIO(data)) as img:
        arr = np.asarray(img.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def normalize(batch: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float, on the batch's device: uint8 travels to the GPU (4x fewer bytes). The
    constants are made once per (mean, std, device): building them per batch would sync with the GPU."""
    m, s = _norm_constants(tuple(mean), tuple(std), batch.device)
    return (batch.float() - m) / s


@functools.lru_cache(maxsize=32)
def _norm_constants(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255.0,
            torch.tensor(std, device=device).view(1, -1, 1, 1) * 255.0)
