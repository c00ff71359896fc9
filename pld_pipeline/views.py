"""Augmented views: parameters drawn from a stable hash, stored, and replayed bit-for-bit.

A view is fully described by five integers in source-image pixels, ``(top, left, height, width, flip)``:
crop that box (zero padding where it leaves the image), resize it to ``size`` x ``size`` if it is not already,
flip horizontally if ``flip``. The random draw happens once (in ``cache-teacher``) and its *realised* values are
stored, so the student's replay does not depend on any RNG implementation: :func:`replay_view` on the same
decoded image gives the identical uint8 tensor the teacher saw.

A *mixed* view (``ViewRecipe.mix``: CutMix or Mixup, timm's ``Mixup`` semantics) adds a partner sample from the
same shard, the partner's own box and flip, the sample's weight lambda and the CutMix box: 17 integers in all
(see ``MIXED_FIELDS``). The teacher saw the mixed uint8 image; :func:`replay_mixed` rebuilds it bit for bit from
both decoded images with integer arithmetic only.
"""
from __future__ import annotations

import functools
import hashlib
import io
import math
import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is imported where views are replayed: recipes and view layouts are read without it
    import torch

RECIPES = ("cifar", "imagenet", "none")
#: The fields a sample's image is read from, first present wins (``--image-field``); part of the recipe, so the
#: student reads the image its teacher saw
IMAGE_FIELDS = "jpg;jpeg;png;webp"
_FIELD_NAME = re.compile(r"^[a-z0-9_][a-z0-9_.-]{0,63}$")
_INTERPOLATIONS = ("bilinear", "bicubic", "nearest")  # torchvision InterpolationMode values


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
    mix: dict[str, Any] | None = None  # MixRecipe.to_dict(); None: plain views only (and left out of to_dict)
    image_field: str = IMAGE_FIELDS  # left out of to_dict at its default (caches from before it still match)

    def __post_init__(self) -> None:
        if self.name not in RECIPES:
            raise ValueError(f"Unsupported view recipe '{self.name}'. Use one of: {', '.join(RECIPES)}.")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"Unsupported interpolation '{self.interpolation}'. Use one of: {', '.join(_INTERPOLATIONS)}.")
        if self.size < 1 or self.pad < 0 or not 0 < self.crop_pct <= 1:
            raise ValueError(f"Bad recipe sizes: size={self.size}, pad={self.pad}, crop_pct={self.crop_pct}.")
        if self.mix is not None:
            MixRecipe.from_dict(self.mix)  # validates
        names = self.image_field.split(";") if isinstance(self.image_field, str) else [None]
        if not 1 <= len(names) <= 16 or not all(isinstance(n, str) and _FIELD_NAME.match(n) for n in names):
            raise ValueError(f"--image-field {self.image_field!r} is not a ;-separated list of sample field names "
                             "(lower-case extensions such as jpg;png).")

    @property
    def mixing(self) -> "MixRecipe | None":
        return None if self.mix is None else MixRecipe.from_dict(self.mix)

    @property
    def params_width(self) -> int:
        """Integers per stored view: 5 for plain recipes (the layout every earlier cache has), 17 with mixing."""
        return len(MIXED_FIELDS) if self.mix is not None else PLAIN_WIDTH

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scale"], d["ratio"] = list(self.scale), list(self.ratio)
        if self.mix is None:  # plain recipes serialise as before, so existing caches' bindings still match
            d.pop("mix")
        if self.image_field == IMAGE_FIELDS:
            d.pop("image_field")
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


class ViewError(ValueError):
    """Stored view parameters no honest writer draws (a stranger's re-signed cache): refused before replaying."""


def box_problem(params: np.ndarray | torch.Tensor | list[int], height: int, width: int,
                recipe: ViewRecipe) -> str | None:
    """What is wrong with a stored box for a ``height`` x ``width`` image, None when it is one the recipe can
    draw: non-empty, flip 0/1, inside the image (``cifar``: the image padded by ``pad``). Checked before every
    replay, so stored integers can never make a crop allocate more than the padded image."""
    top, left, h, w, flip = (int(x) for x in params[:PLAIN_WIDTH])
    if h < 1 or w < 1:
        return f"an empty box ({h}x{w})"
    if flip not in (0, 1):
        return f"a flip other than 0/1 ({flip})"
    if recipe.name != "cifar":  # RandomResizedCrop and centre crops lie inside the image
        if top < 0 or left < 0 or top + h > height or left + w > width:
            return f"a {h}x{w} box at ({top}, {left}) outside the {height}x{width} image"
        return None
    size, pad = recipe.size, recipe.pad
    if (h, w) != (size, size):
        return f"a {h}x{w} box where the cifar recipe crops {size}x{size}"
    # random crops start in [-pad, side - size + pad]; the centre crop at (side - size) // 2 (past -pad only on an
    # image smaller than the crop)
    if not all(min(-pad, (side - size) // 2) <= at <= max(side - size + pad, (side - size) // 2)
               for at, side in ((top, height), (left, width))):
        return f"a {h}x{w} box at ({top}, {left}) outside the {height}x{width} image padded by {pad}"
    return None


def replay_view(image: torch.Tensor, params: np.ndarray | torch.Tensor | list[int], recipe: ViewRecipe,
                check: bool = True, contiguous: bool = True) -> torch.Tensor:
    """The view's uint8 [3, size, size] tensor from a decoded uint8 [3, H, W] image and stored params.
    Deterministic CPU ops only, so teacher and student get identical bytes. Raises :class:`ViewError` for a
    box the recipe cannot draw (:func:`box_problem`); ``check=False`` for params drawn in this process (an eval
    view of an image smaller than the crop pads past ``pad``). ``contiguous=False`` leaves the view in the
    image's memory layout (channels-last from :func:`decode_image`): the same values, for a caller that resizes
    or stacks it next and would otherwise pay for the layout change twice."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF
    box = [int(x) for x in (params.tolist() if hasattr(params, "tolist") else params)]  # one conversion, not ten
    problem = box_problem(box, image.shape[1], image.shape[2], recipe) if check else None
    if problem is not None:
        raise ViewError(f"stored view parameters hold {problem}")
    top, left, h, w, flip = box
    # the image kernels themselves (what TF.crop/resize/horizontal_flip dispatch a plain tensor to): crop first,
    # so only the view's pixels are resized and laid out [3, size, size]
    out = crop(image, top, left, h, w)
    if (h, w) != (recipe.size, recipe.size):
        out = TF.resize_image(out, [recipe.size, recipe.size], interpolation=InterpolationMode(recipe.interpolation),
                              antialias=True)
    if flip:
        out = TF.horizontal_flip_image(out)
    return out.contiguous() if contiguous else out


def crop(image: torch.Tensor, top: int, left: int, height: int, width: int) -> torch.Tensor:
    """``TF.crop``'s result (zeros where the box leaves the image) at half its cost on small images: a view when
    the box lies inside, else the overlap copied into zeros (torchvision pads through ``torch.nn.functional.pad``).
    A box wholly outside the image (which :func:`box_problem` refuses and no draw makes) gives zeros."""
    rows, cols = image.shape[-2:]
    if top >= 0 and left >= 0 and top + height <= rows and left + width <= cols:
        return image[..., top:top + height, left:left + width]
    out = image.new_zeros((*image.shape[:-2], height, width))
    y0, y1, x0, x1 = max(top, 0), min(top + height, rows), max(left, 0), min(left + width, cols)
    if y0 < y1 and x0 < x1:
        out[..., y0 - top:y1 - top, x0 - left:x1 - left] = image[..., y0:y1, x0:x1]
    return out


#: Layout of one stored view of a mixing recipe (``views/params[..., i]``); the first five are a plain view's.
MIXED_FIELDS = ("top", "left", "height", "width", "flip", "kind", "partner_row", "partner_top", "partner_left",
                "partner_height", "partner_width", "partner_flip", "lam", "box_top", "box_left", "box_height",
                "box_width")
PLAIN_WIDTH = 5
KIND_PLAIN, KIND_MIXUP, KIND_CUTMIX = 0, 1, 2
#: lambda is stored as an integer in units of 1/LAMBDA_ONE: the mixup blend is exact integer arithmetic.
LAMBDA_ONE = 1 << 16
MIX_MODES = ("cutmix", "mixup", "both")


@dataclass(frozen=True)
class MixRecipe:
    """How mixed views are drawn (timm ``Mixup`` semantics, per view instead of per batch): with probability
    ``prob`` a view is mixed with a partner drawn from the ``window`` samples before it in its shard (so both
    sides stream a shard with a small buffer); ``both`` picks CutMix with probability ``switch_prob``. lambda ~
    Beta(alpha, alpha); a CutMix box covers ``1 - lambda`` of the view (``minmax``: box sides as fractions of
    the view instead) and lambda is then recomputed from the clipped box, as timm's ``correct_lam``."""
    mode: str = "both"
    prob: float = 0.5
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    minmax: tuple[float, float] | None = None
    switch_prob: float = 0.5
    window: int = 64

    def __post_init__(self) -> None:
        if self.mode not in MIX_MODES:
            raise ValueError(f"Unsupported --mix '{self.mode}'. Use one of: {', '.join(MIX_MODES)}.")
        if not 0.0 <= self.prob <= 1.0 or not 0.0 <= self.switch_prob <= 1.0:
            raise ValueError(f"--mix-prob and the switch probability must lie in [0, 1], got {self.prob}, "
                             f"{self.switch_prob}.")
        if self.mixup_alpha <= 0 and self.mode != "cutmix" or self.cutmix_alpha <= 0 and self.mode != "mixup":
            raise ValueError("Mixing alphas must be > 0 for the modes in use (--mixup-alpha, --cutmix-alpha).")
        if self.minmax is not None and not 0.0 < self.minmax[0] < self.minmax[1] <= 1.0:
            raise ValueError(f"--cutmix-minmax must be two fractions 0 < min < max <= 1, got {self.minmax}.")
        if self.window < 1:
            raise ValueError(f"The mixing window must be >= 1 sample, got {self.window}.")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["minmax"] = None if self.minmax is None else list(self.minmax)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MixRecipe":
        d = dict(d)
        d["minmax"] = None if d.get("minmax") is None else tuple(d["minmax"])
        return cls(**d)


def mix_draw(mix: MixRecipe, seed: int, key: str, view: int, row: int, size: int) -> np.ndarray:
    """The mixing half of a view, before the partner is known: int32 [kind, partner_row, lam, box_top, box_left,
    box_height, box_width]. Drawn from ``view_rng(seed, key + "\x00mix", view)`` in this order: mixed? (uniform),
    CutMix? (uniform, ``both`` only), lambda (beta), partner offset (integer), box (integers). The first row of
    a shard has no partner and stays plain."""
    plain = np.array([KIND_PLAIN, -1, LAMBDA_ONE, 0, 0, 0, 0], np.int32)
    rng = view_rng(seed, key + "\x00mix", view)
    if rng.random() >= mix.prob or row == 0:
        return plain
    cutmix = mix.mode == "cutmix" or (mix.mode == "both" and rng.random() < mix.switch_prob)
    lam = float(rng.beta(*(2 * [mix.cutmix_alpha if cutmix else mix.mixup_alpha])))
    partner = row - 1 - int(rng.integers(min(mix.window, row)))
    box = (0, 0, 0, 0)
    if cutmix:
        if mix.minmax is not None:  # timm rand_bbox_minmax
            lo, hi = int(size * mix.minmax[0]), max(int(size * mix.minmax[0]) + 1, int(size * mix.minmax[1]))
            h, w = int(rng.integers(lo, hi)), int(rng.integers(lo, hi))
            top, left = int(rng.integers(0, size - h)), int(rng.integers(0, size - w))
            y0, y1, x0, x1 = top, top + h, left, left + w
        else:  # timm rand_bbox, margin 0
            cut = math.sqrt(1.0 - lam)
            ch, cw = int(size * cut), int(size * cut)
            cy, cx = int(rng.integers(0, size)), int(rng.integers(0, size))
            y0, y1 = min(max(cy - ch // 2, 0), size), min(max(cy + ch // 2, 0), size)
            x0, x1 = min(max(cx - cw // 2, 0), size), min(max(cx + cw // 2, 0), size)
        box = (y0, x0, y1 - y0, x1 - x0)
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(size * size)  # correct_lam: the pasted area decides
    lam_q = int(round(lam * LAMBDA_ONE))
    return np.array([KIND_CUTMIX if cutmix else KIND_MIXUP, partner, lam_q, *box], np.int32)


def mixed_params(own: np.ndarray, draw: np.ndarray, partner: np.ndarray | None) -> np.ndarray:
    """The 17 stored integers of a view (``MIXED_FIELDS``) from its own box, its mix draw and the partner's box
    (None, or a plain draw, for a plain view)."""
    kind, partner_row, lam, *box = (int(x) for x in draw)
    if kind == KIND_PLAIN or partner is None:
        return np.array([*own[:5], KIND_PLAIN, -1, 0, 0, 0, 0, 0, LAMBDA_ONE, 0, 0, 0, 0], np.int32)
    return np.array([*own[:5], kind, partner_row, *partner[:5], lam, *box], np.int32)


def view_kind(params: np.ndarray | torch.Tensor) -> int:
    return KIND_PLAIN if len(params) == PLAIN_WIDTH else int(params[5])


def view_lambda(params: np.ndarray | torch.Tensor) -> float:
    """The sample's own weight in its view (1.0 for plain views)."""
    return 1.0 if view_kind(params) == KIND_PLAIN else int(params[12]) / LAMBDA_ONE


def own_label_dominates(lam):
    """The sample's own label is its view's dominant one when it weighs at least half (ties: its own); ``lam`` in
    units of 1/LAMBDA_ONE, an int or an array. (losses.MixedLabels.dominant is the same rule on float lambdas.)"""
    return 2 * lam >= LAMBDA_ONE


def first_labels(params: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[n, V] label ranked first per stored view (what ``label_logp`` holds): the sample's own for plain views and
    mixed views where it weighs at least half, else its partner's. ``params`` [n, V, width], ``labels`` the
    shard's rows' labels (partners are rows of the same shard)."""
    own = np.broadcast_to(np.asarray(labels)[:, None], params.shape[:2])
    if params.shape[-1] == PLAIN_WIDTH:
        return own.copy()
    partner_wins = (params[..., 5] != KIND_PLAIN) & ~own_label_dominates(params[..., 12])
    partner = np.asarray(labels)[np.clip(params[..., 6], 0, len(labels) - 1)]
    return np.where(partner_wins, partner, own)


def replay_mixed(image: torch.Tensor, partner: torch.Tensor | None, params: np.ndarray | torch.Tensor,
                 recipe: ViewRecipe) -> torch.Tensor:
    """Any stored view's uint8 [3, size, size] tensor: plain views as :func:`replay_view`; mixed ones replay both
    boxes, then Mixup ``(a * lam + b * (2^16 - lam) + 2^15) >> 16`` in int32 or CutMix (the partner's pixels
    inside the box). Integer arithmetic only: identical bytes on every machine."""
    import torch
    own = replay_view(image, params[:5], recipe)
    kind = view_kind(params)
    if kind == KIND_PLAIN:
        return own
    if kind not in (KIND_MIXUP, KIND_CUTMIX) or not 0 <= int(params[12]) <= LAMBDA_ONE:
        raise ViewError(f"stored view parameters hold a mixing kind {kind} or lambda {int(params[12])} outside "
                        f"{{{KIND_PLAIN}, {KIND_MIXUP}, {KIND_CUTMIX}}} and [0, {LAMBDA_ONE}]")
    if partner is None:
        raise ValueError("A mixed view needs its partner's decoded image (views/params partner_row).")
    other = replay_view(partner, params[7:12], recipe)
    if kind == KIND_MIXUP:
        lam = int(params[12])
        mixed = (own.to(torch.int32) * lam + other.to(torch.int32) * (LAMBDA_ONE - lam) + LAMBDA_ONE // 2) >> 16
        return mixed.to(torch.uint8)
    top, left, h, w = (int(x) for x in params[13:17])
    if min(top, left, h, w) < 0 or top + h > recipe.size or left + w > recipe.size:
        raise ViewError(f"stored view parameters hold a CutMix box {h}x{w} at ({top}, {left}) outside the "
                        f"{recipe.size}x{recipe.size} view")
    out = own.clone()
    out[:, top:top + h, left:left + w] = other[:, top:top + h, left:left + w]
    return out


class ImageTooLarge(ValueError):
    """An image whose header claims more pixels than pld decodes (a small PNG can claim 12000x12000)."""


def decode_image(data: bytes) -> torch.Tensor:
    """Encoded image bytes -> uint8 [3, H, W] RGB tensor (PIL; the same decoder on both sides), channels-last in
    memory (call ``.contiguous()`` where a copy in [3, H, W] order is needed). An image of more
    than PIL's ``Image.MAX_IMAGE_PIXELS`` (89,478,485 by default; raise it in Python to allow larger ones) is an
    error, checked from the header before anything is decoded; PIL itself only warns below twice that."""
    import torch
    from PIL import Image
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(" ".join(str(e).split())) from None
    with img:
        cap = Image.MAX_IMAGE_PIXELS
        if cap is not None and img.width * img.height > cap:
            raise ImageTooLarge(f"{img.width}x{img.height} pixels, more than the {cap:,} pld decodes "
                                "(PIL.Image.MAX_IMAGE_PIXELS)")
        arr = np.array(img if img.mode == "RGB" else img.convert("RGB"))  # writable, row-major [H, W, 3]
    # a [3, H, W] view of the [H, W, 3] pixels (channels-last strides), not a copy: replay crops first, so only
    # the view's pixels ever change layout (resizing reads channels-last input at least as fast, same bytes)
    return torch.from_numpy(arr).permute(2, 0, 1)


def normalize(batch: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float, on the batch's device: uint8 travels to the GPU (4x fewer bytes). The
    constants are made once per (mean, std, device): building them per batch would sync with the GPU."""
    m, s = _norm_constants(tuple(mean), tuple(std), batch.device)
    return (batch.float() - m) / s


@functools.lru_cache(maxsize=32)
def _norm_constants(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    import torch
    return (torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255.0,
            torch.tensor(std, device=device).view(1, -1, 1, 1) * 255.0)
