"""A tiny MLP whose training forward sleeps: a run that stays inside its steps long enough to be signalled."""

import time

from torch import nn


class SlowMLP(nn.Module):
    def __init__(self, in_features: int, num_classes: int, sleep: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, 8), nn.ReLU(), nn.Linear(8, num_classes))
        self.sleep = sleep

    def forward(self, x):
        if self.training and self.sleep:
            time.sleep(self.sleep)
        return self.net(x)
