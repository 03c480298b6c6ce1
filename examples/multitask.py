"""A two-head model: class ids and a value per sample, one combined loss, metrics per head.

    python examples/multitask.py

The targets are a dict ``{"cls": class ids, "reg": values}``; the model returns a dict with the same keys.
With dict (or tuple) targets the loss gets the model's whole output and the whole target, and each head is
scored by its own task (inferred from the first batch: integer targets with [B, C] logits are multiclass,
float targets regression; or given as ``task={"cls": "multiclass", "reg": "regression"}``).
"""

import torch
import torch.nn.functional as F
from torch import nn

from trainval import Trainer


class TwoHead(nn.Module):
    def __init__(self, in_features: int = 5, num_classes: int = 3, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_features, width), nn.ReLU())
        self.cls = nn.Linear(width, num_classes)
        self.reg = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)
        return {"cls": self.cls(h), "reg": self.reg(h).squeeze(-1)}


def combined_loss(outputs: dict, targets: dict) -> torch.Tensor:
    return F.cross_entropy(outputs["cls"], targets["cls"]) + 0.5 * F.mse_loss(outputs["reg"], targets["reg"])


def make(n: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 5, generator=g)
    y_cls = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()
    y_reg = 2.0 * X[:, 2] - X[:, 3] + 0.1 * torch.randn(n, generator=g)
    return X, {"cls": y_cls, "reg": y_reg}


if __name__ == "__main__":
    torch.manual_seed(0)
    trainer = Trainer(
        TwoHead(),
        loss_fn=combined_loss,
        metrics={"cls": ["acc", "f1_macro"], "reg": ["mae"]},  # columns val_cls_acc, val_reg_mae, ...
        monitor="val_reg_mae",  # lower is better: best.pt keeps the smallest error
        max_epochs=10,
        out_dir="runs/multitask",
        overwrite=True,
        progress=False,
    )
    trainer.fit(make(600, 0), make(200, 1))
    print(trainer.test(make(200, 2)))
    predictions = trainer.predict(make(5, 3)[0])  # {"cls": class ids, "reg": values}
    print({head: p.tolist() for head, p in predictions.items()})
