"""Fine-tuning with a frozen backbone whose BatchNorm stays in eval mode while the head trains."""
import torch
from torch import nn


def set_train_mode(model):
    model.train()
    model.backbone.eval()  # frozen: keep BatchNorm statistics


def finetune(model, loader, val_loader, epochs=3):
    for p in model.backbone.parameters():
        p.requires_grad = False
    opt = torch.optim.SGD(model.head.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        set_train_mode(model)
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = sum((model(x).argmax(1) == y).sum().item() for x, y in val_loader) / len(val_loader.dataset)
        print(epoch, acc)
