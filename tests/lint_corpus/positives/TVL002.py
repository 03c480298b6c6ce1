import torch


def train_a(model, loader, optimizer, criterion):
    model.train()
    for x, y in loader:
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()  # expect: TVL002


def train_b(model, loader, criterion, epochs):
    opt = torch.optim.Adam(model.parameters())
    for epoch in range(epochs):
        opt.zero_grad()  # once per epoch: gradients still pile up over the batches
        for x, y in loader:
            criterion(model(x), y).backward()
            opt.step()  # expect: TVL002


class Runner:
    def run(self, loader):
        self.net.train()
        step = 0
        while step < 1000:
            for x, y in loader:
                loss = self.criterion(self.net(x), y)
                loss.backward()
                if step % 4 == 0:
                    self.optim.step()  # expect: TVL002
                step += 1
