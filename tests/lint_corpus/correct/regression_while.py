"""Regression with MSE, a while loop over epochs, a ReduceLROnPlateau scheduler, per-sample means."""
import torch
from torch import nn


def train(model, X, y, X_val, y_val, batch_size=128, max_epochs=100):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=3)
    loss_fn = nn.MSELoss()
    epoch = 0
    while epoch < max_epochs:
        model.train()
        perm = torch.randperm(len(X))
        sq_sum = torch.zeros(())
        for i in range(0, len(X), batch_size):
            idx = perm[i : i + batch_size]
            pred = model(X[idx])
            loss = loss_fn(pred, y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            sq_sum += loss.detach() * len(idx)
        model.eval()
        with torch.no_grad():
            val_loss = loss_fn(model(X_val), y_val).item()
        scheduler.step(val_loss)
        print(f"epoch {epoch}: train mse {sq_sum.item() / len(X):.4f} val mse {val_loss:.4f}")
        epoch += 1
