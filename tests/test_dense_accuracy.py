"""Accuracy of a dense (per-position) multiclass model counts positions, not samples: a segmentation-like
``[B, C, L]`` output with ``[B, L]`` targets gave val_acc 3.65 (correct positions over samples) when no
target was ignored. Checked against scikit-learn on the run's own predictions, with and without ignored
positions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score
from torch import nn

from trainval import Trainer


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 3, 8, generator=g)
    y = (x[:, 0] > 0).long()
    return x, y


@pytest.mark.parametrize("ignore", [None, 1])
def test_dense_accuracy_is_over_positions(tmp_path, ignore):
    torch.manual_seed(0)
    x, y = _problem()
    if ignore is not None:
        y = y.clone()
        y[:, :2] = -100  # the first two positions of every sample are ignored
    model = nn.Conv1d(3, 2, 1)
    trainer = Trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), max_epochs=2, batch_size=8,
        out_dir=str(tmp_path), progress=False, plot=False, ignore_index=-100 if ignore else None,
        metrics=["acc", "top1_acc"],
    )  # fmt: skip
    history = trainer.fit((x, y), (x, y))
    scores = trainer.validate((x, y))
    predicted = trainer.predict(x, ckpt=None).numpy().reshape(-1)
    kept = y.numpy().reshape(-1) != -100
    expected = accuracy_score(y.numpy().reshape(-1)[kept], predicted[kept])
    assert 0.0 <= history[-1]["val_acc"] <= 1.0
    assert scores["val_acc"] == pytest.approx(expected, abs=1e-12)
    assert scores["val_top1_acc"] == pytest.approx(expected, abs=1e-12)
    assert np.isclose(history[-1]["val_acc"], scores["val_acc"], atol=1e-12)  # the row's value: the same weights
