import torch


def train_a(model, loader, optimizer, criterion):
    for x, y in loader:
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.zero_grad()  # expect: TVL001
        optimizer.step()


def train_b(model, loader, criterion):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for epoch in range(10):
        for batch in loader:
            out = model(batch["x"])
            loss = criterion(out, batch["y"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.zero_grad()  # expect: TVL001
            opt.step()


class Trainer:
    def fit(self, loader):
        for x, y in loader:
            loss = self.loss_fn(self.model(x), y)
            loss.backward()
            if self.log:
                print("step")
            self.optimizer.zero_grad(set_to_none=True)  # expect: TVL001
            self.optimizer.step()


def train_d(models, optimizers, loader):
    for x, y in loader:
        for i in range(2):
            loss = models[i](x).sum()
            loss.backward()
            optimizers[i].zero_grad()  # expect: TVL001
            optimizers[i].step()
