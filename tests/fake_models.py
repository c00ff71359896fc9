"""Model factories for `module.path:factory` tests."""
import torch
import torch.nn as nn


class _NaNAfter(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.lin = nn.Linear(3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.mean((2, 3))) * float("nan")


def nan_model(num_classes: int = 10, **_) -> nn.Module:
    return _NaNAfter(num_classes)


def tiny_mlp(num_classes: int = 10, **_) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.LazyLinear(32), nn.ReLU(), nn.Linear(32, num_classes))
    m.num_classes = num_classes
    return m


def plain_cnn() -> nn.Module:
    """A factory that takes no arguments and a model without a `num_classes` attribute: its width (7) is only
    in its weights."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 7))
