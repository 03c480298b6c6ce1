"""eval() in a caller, eval() inside, Lightning hooks, eval at the top of the function."""
import pytorch_lightning as pl
import torch


def run_validation(model, loader):
    with torch.no_grad():
        return [model(x) for x, _ in loader]


def fit(model, train_loader, val_loader, optimizer, criterion, epochs):
    for epoch in range(epochs):
        model.train()
        for x, y in train_loader:
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            optimizer.step()
        model.eval()
        run_validation(model, val_loader)


@torch.inference_mode()
def predict(net, xs):
    net.eval()
    return [net(x).argmax(1) for x in xs]


class Module(pl.LightningModule):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        return self.model(x)

    def test_step(self, batch, batch_idx):
        return self.model(batch[0])


def evaluate(model, loader):
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = [model(x) for x, _ in loader]
    model.train(was_training)
    return out
