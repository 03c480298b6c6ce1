"""A class-based trainer with methods, aliases and early stopping."""
import torch


class Trainer:
    def __init__(self, model, optimizer, criterion, scheduler=None, patience=5):
        self.model, self.optimizer, self.criterion = model, optimizer, criterion
        self.scheduler, self.patience = scheduler, patience

    def train_epoch(self, loader):
        self.model.train()
        total = torch.zeros(())
        for x, y in loader:
            self.optimizer.zero_grad()
            loss = self.criterion(self.model(x), y)
            loss.backward()
            self.optimizer.step()
            total += loss.detach() * len(y)
        return (total / len(loader.dataset)).item()

    @torch.no_grad()
    def evaluate(self, loader):
        self.model.eval()
        total = 0.0
        for x, y in loader:
            total += self.criterion(self.model(x), y).item() * len(y)
        return total / len(loader.dataset)

    def fit(self, train_loader, val_loader, epochs):
        best, waited = float("inf"), 0
        for epoch in range(epochs):
            train_loss = self.train_epoch(train_loader)
            val_loss = self.evaluate(val_loader)
            if self.scheduler is not None:
                self.scheduler.step(val_loss)
            if val_loss < best:
                best, waited = val_loss, 0
                torch.save(self.model.state_dict(), "best.pt")
            else:
                waited += 1
                if waited >= self.patience:
                    break
            print(epoch, train_loss, val_loss)
