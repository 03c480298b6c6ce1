"""step after backward; scheduler.step at the top; step at the top for accumulated gradients; LBFGS."""


def scheduler_first(model, loader, optimizer, scheduler, criterion):
    for x, y in loader:
        scheduler.step()
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()


def delayed_step(model, loader, optimizer, criterion, k):
    for i, (x, y) in enumerate(loader):
        if i > 0 and i % k == 0:
            optimizer.step()
            optimizer.zero_grad()
        criterion(model(x), y).backward()


def lbfgs(model, x, y, optimizer, criterion):
    for _ in range(10):
        def closure():
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            return loss
        optimizer.step(closure)


def normal(model, loader, optimizer, criterion):
    for x, y in loader:
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
