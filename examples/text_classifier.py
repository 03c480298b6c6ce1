"""A text classifier fed Hugging Face style dict batches, through the Python API.

Each sample is a dict ``{"input_ids": LongTensor[L], "labels": int}`` of its own length; a collate
function pads a batch to ``{"input_ids", "attention_mask", "labels"}``. trainval takes the target from
``"labels"`` and calls ``model(input_ids=..., attention_mask=...)``; the model returns a dict whose
``"logits"`` are the prediction (as a transformers ``ModelOutput`` does). The data is made here: a
"sentence" is positive when more of its tokens come from the upper half of a 50-word vocabulary.

    python examples/text_classifier.py [--epochs 8] [--out runs/text]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from trainval import Trainer, seed_everything

VOCAB = 50


class Sentences(Dataset):
    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.samples = []
        for _ in range(n):
            length = int(torch.randint(4, 16, (1,), generator=g))
            ids = torch.randint(1, VOCAB, (length,), generator=g)
            self.samples.append({"input_ids": ids, "labels": int((ids >= VOCAB // 2).sum() * 2 > length)})

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]


def pad(samples: list[dict]) -> dict:
    """Pad to the longest sentence of the batch; 0 is the padding token."""
    width = max(len(s["input_ids"]) for s in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, : len(s["input_ids"])] = s["input_ids"]
    return {"input_ids": ids, "attention_mask": (ids != 0).long(),
            "labels": torch.tensor([s["labels"] for s in samples])}


class BagOfEmbeddings(nn.Module):
    def __init__(self, dim: int = 32, classes: int = 2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim, padding_idx=0)
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(0.1), nn.Linear(dim, classes))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        mask = attention_mask.unsqueeze(-1).float()
        mean = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return {"logits": self.head(mean)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--out", default="runs/text")
    args = ap.parse_args()
    seed_everything(0)
    train = DataLoader(Sentences(2000, 0), batch_size=32, shuffle=True, collate_fn=pad)
    val = DataLoader(Sentences(300, 1), batch_size=64, collate_fn=pad)
    test = DataLoader(Sentences(300, 2), batch_size=64, collate_fn=pad)
    model = BagOfEmbeddings()
    trainer = Trainer(model, torch.optim.AdamW(model.parameters(), lr=3e-3), nn.CrossEntropyLoss(),
                      metrics=["acc", "f1_macro"], monitor="val_f1_macro", max_epochs=args.epochs,
                      out_dir=args.out, overwrite=True)
    trainer.fit(train, val)
    result = trainer.test(test)  # reloads best.pt
    print(f"Test F1 (macro): {result['test_f1_macro']:.4f} Acc: {result['test_acc']:.4f}")


if __name__ == "__main__":
    main()
