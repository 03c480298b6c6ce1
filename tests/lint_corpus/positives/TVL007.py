def train_a(model, loader, optimizer, criterion):
    total_loss = 0
    for x, y in loader:
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        total_loss += loss  # expect: TVL007
    return total_loss / len(loader)


def train_b(model, loader, opt, loss_fn):
    running = 0.0
    for step, (x, y) in enumerate(loader):
        opt.zero_grad()
        batch_loss = loss_fn(model(x), y)
        batch_loss.backward()
        opt.step()
        running = running + batch_loss  # expect: TVL007


def train_c(self, loader):
    self.epoch_loss = 0
    for x, y in loader:
        self.optimizer.zero_grad()
        loss = self.criterion(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        self.epoch_loss += loss * x.size(0)  # expect: TVL007
