"""The few built-in models the CLI offers: an MLP for feature vectors and a small CNN for images."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


class MLP(nn.Module):
    """Linear -> [BatchNorm] -> ReLU -> [Dropout] blocks, then a linear head producing logits."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: Sequence[int] = (256, 128),
        dropout: float = 0.0,
        batchnorm: bool = False,
    ):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers.append(nn.Linear(width, h))
            if batchnorm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class CNN(nn.Module):
    """Two conv blocks (conv-BN-ReLU, max-pool) with Dropout, then a linear head; any image size."""

    def __init__(
        self, in_channels: int, num_classes: int, channels: Sequence[int] = (32, 64), dropout: float = 0.25
    ):
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1),
            nn.BatchNorm2d(c1),
            nn.ReLU(),
            nn.Conv2d(c1, c1, 3, padding=1),
            nn.BatchNorm2d(c1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Dropout(dropout),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.BatchNorm2d(c2),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Dropout(dropout),
        )
        self.head = nn.Linear(c2 * 4, num_classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))
