"""Mixed precision on CUDA with autocast and GradScaler."""
import torch
from torch import nn


def train(model, train_loader, val_loader, epochs=10):
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=epochs * len(train_loader))
    scaler = torch.amp.GradScaler("cuda")
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    for epoch in range(epochs):
        model.train()
        running = torch.zeros((), device="cuda")
        for inputs, targets in train_loader:
            inputs, targets = inputs.cuda(non_blocking=True), targets.cuda(non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.float16):
                loss = criterion(model(inputs), targets)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            running += loss.detach()
        model.eval()
        correct = 0
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
            for inputs, targets in val_loader:
                correct += (model(inputs.cuda()).argmax(1) == targets.cuda()).sum().item()
        print(f"epoch {epoch}: train loss {running.item() / len(train_loader):.4f}, val acc {correct / len(val_loader.dataset):.4f}")
