"""Zeroing in a helper, via the model, via set_to_none assignment, accumulation over the epoch."""


def step_and_zero(opt):
    opt.step()
    opt.zero_grad()


def helper_zero(model, loader, opt, criterion):
    for x, y in loader:
        criterion(model(x), y).backward()
        step_and_zero(opt)


def model_zero(model, loader, opt, criterion):
    for x, y in loader:
        model.zero_grad()
        criterion(model(x), y).backward()
        opt.step()


def grad_none(model, loader, opt, criterion):
    for x, y in loader:
        for p in model.parameters():
            p.grad = None
        criterion(model(x), y).backward()
        opt.step()


def full_batch(model, loader, opt, criterion, epochs):
    for epoch in range(epochs):
        opt.zero_grad()
        for x, y in loader:
            criterion(model(x), y).backward()  # accumulate over the epoch on purpose
        opt.step()


class Loop:
    def zero(self):
        self.optimizer.zero_grad(set_to_none=True)

    def fit(self, loader):
        for x, y in loader:
            self.zero()
            self.loss(self.model(x), y).backward()
            self.optimizer.step()
            self.scheduler.step()
