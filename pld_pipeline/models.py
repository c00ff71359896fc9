"""Models: CIFAR ResNets registered into timm, and loading any model by name, factory path or checkpoint.

The CIFAR ResNets follow He et al. 2016's CIFAR design with "option A" (parameter-free) shortcuts, key for key
compatible with the widely used akamaster/pytorch_resnet_cifar10 checkpoints (``conv1``, ``bn1``,
``layer{1,2,3}.{i}.conv{1,2}``, ``linear``); they have no hub weights, load the published files as checkpoints.
Hub models load through timm's own ``pretrained=True`` path.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import os
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import create_model, register_model
from .files import open_regular

__all__ = ["CifarResNet", "load_model", "load_state_dict", "file_sha256", "preprocessing_of", "pretrained_identity",
           "require_teacher_input", "student_preprocessing"]

_CIFAR_CFG = {"input_size": (3, 32, 32), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
              "interpolation": "bilinear", "crop_pct": 1.0, "num_classes": 10, "first_conv": "conv1",
              "classifier": "linear"}


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # Option A: subsample spatially and zero-pad channels; no weights.
        self.pad = (planes - in_planes) // 2 if stride != 1 or in_planes != planes else None
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.pad is not None:
            shortcut = F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: 16/32/64 channels, global average pool, linear head."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_chans: int = 3, **_: Any) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, 32, 44, 56, 110), got {depth}.")
        n = (depth - 2) // 6
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, 1)
        self.layer2 = self._stage(16, 32, n, 2)
        self.layer3 = self._stage(32, 64, n, 2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [_BasicBlock(in_planes, planes, stride)]
        layers += [_BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _cifar_resnet(depth: int, pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    if pretrained:
        raise ValueError("CIFAR ResNets have no hub weights; pass --teacher-checkpoint / --init-checkpoint instead.")
    for k in ("pretrained_cfg", "pretrained_cfg_overlay", "features_only", "cache_dir"):
        kwargs.pop(k, None)
    model = CifarResNet(depth, **kwargs)
    model.pretrained_cfg = dict(_CIFAR_CFG, num_classes=model.num_classes)
    model.default_cfg = model.pretrained_cfg
    return model


@register_model
def cifar_resnet8(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    return _cifar_resnet(8, pretrained, **kwargs)


@register_model
def cifar_resnet14(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    return _cifar_resnet(14, pretrained, **kwargs)


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    return _cifar_resnet(20, pretrained, **kwargs)


@register_model
def cifar_resnet32(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    return _cifar_resnet(32, pretrained, **kwargs)


@register_model
def cifar_resnet44(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    return _cifar_resnet(44, pretrained, **kwargs)


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    return _cifar_resnet(56, pretrained, **kwargs)


@register_model
def cifar_resnet110(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    return _cifar_resnet(110, pretrained, **kwargs)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with os.fdopen(open_regular(path), "rb") as f:  # a regular file: a FIFO or device is refused, not read forever
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors / .pth / .pt / .th, unwrapping ``{"state_dict"|"model"|"state_dict_ema":
    ...}`` and stripping DataParallel/DDP ``module.`` prefixes."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint {path} does not exist.")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        state: Any = load_file(path, device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary code
        except Exception as e:  # noqa: BLE001 - torch raises a long UnpicklingError
            raise ValueError(f"{path} is not a plain weights file torch can load safely ({type(e).__name__}); "
                             "re-save its state_dict with torch.save or as .safetensors.") from None
    for wrapper in ("state_dict_ema", "state_dict", "model"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state dict of tensors.")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def output_width(model: nn.Module) -> int | None:
    """The classifier width: ``num_classes`` where the model has it (timm), else its last 2-D weight's rows."""
    width = getattr(model, "num_classes", None)
    return int(width) if width else _classes_in_state(model.state_dict())


def _classes_in_state(state: dict[str, torch.Tensor]) -> int | None:
    """The output width of the last 2-D weight (the classifier), to size the model before loading."""
    for key in reversed(list(state)):
        if key.endswith("weight") and state[key].ndim == 2:
            return int(state[key].shape[0])
    return None


_TIMM_SCHEMES = ("hf-hub:", "local-dir:")  # model names timm resolves itself, not module.path:factory


def load_model(source: str, *, num_classes: int | None = None, checkpoint: str | None = None,
               pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """A model from a timm name (incl. the registered ``cifar_resnet*``, pretrained tags and ``hf-hub:`` names) or
    ``module.path:factory``, optionally with a checkpoint. ``num_classes`` defaults to the checkpoint's classifier
    width. ``pretrained`` loads the hub weights through timm's own path (Hugging Face cache, ``HF_HOME``,
    ``HF_HUB_OFFLINE``); see :func:`pretrained_identity` for what was loaded."""
    if pretrained and checkpoint:
        raise ValueError(f"Give {source!r} either pretrained hub weights or a checkpoint file, not both.")
    state = load_state_dict(checkpoint) if checkpoint else None
    if num_classes is None and state is not None:
        num_classes = _classes_in_state(state)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if ":" in source and not source.startswith(_TIMM_SCHEMES):
        module_name, _, attr = source.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"Cannot import model factory {source!r}: {e}.") from e
        accepts = inspect.signature(factory).parameters
        if pretrained:
            if "pretrained" not in accepts:
                raise ValueError(f"Factory {source!r} takes no `pretrained` argument; give its weights as a checkpoint.")
            kwargs["pretrained"] = True
        if "num_classes" in kwargs and "num_classes" not in accepts and not any(
                p.kind is p.VAR_KEYWORD for p in accepts.values()):
            kwargs.pop("num_classes")  # the factory fixes its width; the checkpoint or the model tells it
        model = factory(**kwargs)
    else:
        if pretrained:
            _fail_fast_without_hub(source)
        try:
            model = create_model(source, pretrained=pretrained, **kwargs)
        except RuntimeError as e:
            if "Unknown model" in str(e):
                raise ValueError(f"Unknown model {source!r}{_did_you_mean(source)}: not a timm model name (see "
                                 "timm.list_models()) nor a module.path:factory.") from e
            if pretrained:
                raise _weights_not_found(source, e) from None
            raise
        except (OSError, ValueError) as e:  # huggingface_hub: LocalEntryNotFoundError, offline, no network
            if pretrained:
                raise _weights_not_found(source, e) from None
            raise
    if state is not None:
        try:  # torch decides what fits (old checkpoints without BatchNorm's num_batches_tracked do)
            model.load_state_dict(state)
        except RuntimeError as e:
            misfit = _misfit(model.state_dict(), state) or " ".join(str(e).split())[:300]
            raise ValueError(f"Checkpoint {checkpoint} does not fit model {source!r}: {misfit}.") from None
    return model


def _misfit(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str | None:
    """Why a checkpoint does not fit a model, in one line (torch lists every key: kilobytes for a wrong depth)."""
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]  # optional for torch
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and state[k].shape != own[k].shape]
    classifier = next((k for k in reversed(list(own)) if k.endswith("weight") and own[k].ndim == 2), None)
    if shapes == [classifier] or (classifier in shapes and not missing and not unexpected):
        got, want = state[classifier].shape[0], own[classifier].shape[0]
        return (f"its classifier ({classifier}) has {got} classes, the model was built for {want} (--num-classes); "
                f"drop --num-classes to use the checkpoint's {got}, or start from a {want}-class checkpoint")
    parts = []
    if missing:
        parts.append(f"{len(missing)} of the model's {len(own)} weights are not in it (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} of its weights are not in the model (e.g. {unexpected[0]})")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} differ in shape (e.g. {k}: {tuple(state[k].shape)} in the checkpoint, "
                     f"{tuple(own[k].shape)} in the model)")
    if not parts:
        return None
    return "; ".join(parts) + ": it was saved from another architecture or depth; give the matching model name"


def _did_you_mean(name: str) -> str:
    """`` (did you mean 'cifar_resnet56'?)``: this project's models first (``resnet56`` is a CIFAR ResNet here,
    not timm's ImageNet ``resnet50``), then the closest timm names."""
    import difflib

    from timm import list_models
    names = list_models()
    arch = name.split(".")[0]
    ours = [n for n in names if n.startswith("cifar_") and n.endswith(arch)]
    close = difflib.get_close_matches(arch, names, n=3, cutoff=0.75)
    shown = list(dict.fromkeys(ours + close))[:3]
    return f" (did you mean {' or '.join(repr(n) for n in shown)}?)" if shown else ""


HUB_PROBE_SECONDS = 3.0
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def _hub_dir() -> str:
    return os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "hub")


def _hub_repo(source: str) -> str | None:
    if source.startswith("hf-hub:"):
        return source[len("hf-hub:"):]
    try:
        from timm.models import get_pretrained_cfg
        return getattr(get_pretrained_cfg(source), "hf_hub_id", None)
    except Exception:  # noqa: BLE001 - only for messages and the probe
        return None


def _fail_fast_without_hub(source: str) -> None:
    """Weights that are not in the Hugging Face cache, with a hub that cannot be reached: refused after a short
    connection probe, where the hub client would retry for a minute or more before failing. Skipped offline
    (HF_HUB_OFFLINE), behind a proxy (only it knows the way) and when the weights are cached."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or any(os.environ.get(v) for v in _PROXY_VARIABLES):
        return
    repo = _hub_repo(source)
    if repo is None:
        return
    from huggingface_hub import try_to_load_from_cache
    if any(isinstance(try_to_load_from_cache(repo.partition("@")[0], f), str)
           for f in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")):
        return
    import socket
    from urllib.parse import urlsplit
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = urlsplit(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=HUB_PROBE_SECONDS).close()
    except OSError as e:
        raise ValueError(
            f"Cannot load pretrained weights for {source!r}: they are not in the Hugging Face cache {_hub_dir()} and "
            f"{endpoint} cannot be reached ({type(e).__name__} within {HUB_PROBE_SECONDS:g} s). On a machine "
            f"without network set HF_HUB_OFFLINE=1 and put the weights in that cache (huggingface-cli download "
            f"{repo} where there is access), or pass the weight file with --teacher-checkpoint / "
            "--init-checkpoint.") from None


def _weights_not_found(source: str, error: Exception) -> ValueError:
    hub = _hub_dir()
    offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else ""
    repo = _hub_repo(source)
    return ValueError(
        f"Cannot load pretrained weights for {source!r}: looked in the Hugging Face cache {hub}{offline} and found "
        f"none ({type(error).__name__}). Download them there on a machine with access (huggingface-cli download "
        f"{repo or 'REPO'}), or pass the weight file with --teacher-checkpoint / --init-checkpoint (in Python: "
        "timm's pretrained_cfg_overlay=dict(file=PATH)).")


def pretrained_identity(model: nn.Module) -> dict[str, Any] | None:
    """What identifies the hub weights a ``pretrained=True`` model loaded: hub id, tag, revision and the sha256 of
    the weight file, resolved from the Hugging Face cache the way timm found it. None when not from the hub."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    hub_id = cfg.get("hf_hub_id")
    if not hub_id:
        return {"url": cfg["url"], "tag": cfg.get("tag")} if cfg.get("url") else None
    from huggingface_hub import try_to_load_from_cache
    repo, _, revision = hub_id.partition("@")
    for filename in filter(None, (cfg.get("hf_hub_filename"), "model.safetensors", "pytorch_model.bin")):
        path = try_to_load_from_cache(repo, filename, revision=revision or None)
        if isinstance(path, str):
            snapshot = os.path.basename(os.path.dirname(path))
            return {"hub_id": repo, "tag": cfg.get("tag"), "revision": snapshot, "file": filename,
                    "sha256": file_sha256(path)}
    return {"hub_id": repo, "tag": cfg.get("tag"), "revision": revision or None, "file": None, "sha256": None}


def preprocessing_of(model: nn.Module, **overrides: Any) -> dict[str, Any]:
    """Input preprocessing as the model declares it in its ``pretrained_cfg`` (timm convention), with explicit
    overrides. What it does not declare stays None: a teacher's input size or normalisation is never guessed
    (see :func:`require_teacher_input`)."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    out = {
        "input_size": list(cfg["input_size"]) if cfg.get("input_size") else None,
        "mean": list(cfg["mean"]) if cfg.get("mean") else None,
        "std": list(cfg["std"]) if cfg.get("std") else None,
        "interpolation": cfg.get("interpolation"),
        "crop_pct": float(cfg["crop_pct"]) if cfg.get("crop_pct") else None,
    }
    out.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in overrides.items() if v is not None})
    return out


def require_teacher_input(prep: dict[str, Any], name: str, size_given: bool) -> None:
    """A teacher that does not declare its input size (unless ``--size`` is given) or its mean/std is refused:
    a guessed 224 px upscale or the wrong normalisation gives a cache of near-chance targets, silently."""
    missing = [opt for opt, undeclared in (("--size", prep["input_size"] is None and not size_given),
                                           ("--mean", prep["mean"] is None), ("--std", prep["std"] is None))
               if undeclared]
    if missing:
        raise ValueError(f"Teacher {name!r} does not declare its input preprocessing (no timm pretrained_cfg "
                         f"{'/'.join(m[2:] for m in missing)}); pass {' and '.join(missing)} as it was trained "
                         "(e.g. --size 32 --mean 0.4914,0.4822,0.4465 --std 0.247,0.243,0.261).")


def student_preprocessing(model: nn.Module) -> dict[str, Any]:
    """A student's preprocessing: its declared one, else ImageNet mean/std. A student trains from scratch with
    the same normalisation at train and eval time, so any fixed choice is consistent (and recorded)."""
    prep = preprocessing_of(model)
    defaults = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    return {**prep, **{k: v for k, v in defaults.items() if prep[k] is None}}
