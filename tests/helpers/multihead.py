"""A two-head model (class ids and a value per sample), its combined loss and data, for tests/test_multitask.py.

Imported by the tests, by the CLI (``model.name=multihead:TwoHead``, ``task.loss=multihead:combined_loss``,
``data.factory=multihead:arrays``) and run under torchrun as a child: ``multihead.py OUT_DIR``.
"""

import json
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, IterableDataset

LOSS_CALLS = []  # (type of outputs, type of targets) per call: the loss sees both whole


class TwoHead(nn.Module):
    def __init__(self, in_features=5, num_classes=3, width=16):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_features, width), nn.ReLU())
        self.cls = nn.Linear(width, num_classes)
        self.reg = nn.Linear(width, 1)

    def forward(self, x):
        h = self.body(x)
        return {"cls": self.cls(h), "reg": self.reg(h).squeeze(-1)}


class TupleTwoHead(TwoHead):
    def forward(self, x):
        out = super().forward(x)
        return out["cls"], out["reg"]


def mcc(pred, target):
    """A plain-function metric: called once per epoch on every sample (gathered across ranks)."""
    from sklearn.metrics import matthews_corrcoef

    return matthews_corrcoef(target.numpy(), pred.numpy())


def combined_loss(outputs, targets):
    LOSS_CALLS.append((type(outputs).__name__, type(targets).__name__))
    return F.cross_entropy(outputs["cls"], targets["cls"]) + F.mse_loss(outputs["reg"], targets["reg"])


def tuple_loss(outputs, targets):
    return F.cross_entropy(outputs[0], targets[0]) + F.mse_loss(outputs[1], targets[1])


def make(n, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 5, generator=g)
    y_cls = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()
    y_reg = 2.0 * X[:, 2] - X[:, 3] + 0.1 * torch.randn(n, generator=g)
    return X, {"cls": y_cls, "reg": y_reg}


def arrays():
    return {"train": make(120, 0), "val": make(45, 1), "test": make(37, 2)}


class Pairs(Dataset):
    """``(x, {"cls": class id, "reg": value})`` samples: the default collate makes dict targets."""

    def __init__(self, X, y):
        self.X, self.y = X, y

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return self.X[i], {"cls": self.y["cls"][i], "reg": self.y["reg"][i]}


class Stream(IterableDataset):
    def __init__(self, X, y):
        self.X, self.y = X, y

    def __iter__(self):
        for i in range(len(self.X)):
            yield self.X[i], {"cls": self.y["cls"][i], "reg": self.y["reg"][i]}


if __name__ == "__main__":  # torchrun child: fit, test and predict; rank 0 writes what the test compares
    from trainval import Trainer

    out_dir = sys.argv[1]
    torch.manual_seed(0)
    data = arrays()
    trainer = Trainer(
        TwoHead(),
        loss_fn=combined_loss,
        metrics={"cls": ["acc", "f1_macro", mcc], "reg": ["mae", "mse"]},
        max_epochs=3,
        batch_size=16,
        out_dir=os.path.join(out_dir, "run"),
        progress=False,
        monitor="val_reg_mae",
        device="cpu",
    )
    trainer.fit(data["train"], data["val"])
    metrics = trainer.test(data["test"])
    predictions = trainer.predict(data["test"][0])
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        torch.save(
            {"predictions": predictions, "metrics": metrics, "mode": trainer.mode},
            os.path.join(out_dir, "result.pt"),
        )
    with open(os.path.join(out_dir, f"done.{rank}"), "w") as f:
        json.dump(metrics, f)
