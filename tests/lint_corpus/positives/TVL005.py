import torch


def fit_a(model, train_loader, val_loader, optimizer, criterion, epochs):
    model.train()
    for epoch in range(epochs):
        for x, y in train_loader:
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            optimizer.step()
        model.eval()  # expect: TVL005
        with torch.no_grad():
            for x, y in val_loader:
                model(x)


@torch.no_grad()
def evaluate(model, loader):
    model.eval()
    return sum((model(x).argmax(1) == y).sum().item() for x, y in loader)


def fit_b(model, train_loader, val_loader, opt, loss_fn, epochs):
    model.train()
    for epoch in range(epochs):
        for x, y in train_loader:
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        acc = evaluate(model, val_loader)  # expect: TVL005
        print(epoch, acc)


def train_one_epoch(net, loader, opt):
    for x, y in loader:
        opt.zero_grad()
        net(x).sum().backward()
        opt.step()


def fit_c(net, loader, val_loader, opt):
    net.train()
    for epoch in range(5):
        train_one_epoch(net, loader, opt)
        net.eval()  # expect: TVL005
        with torch.no_grad():
            for x, _ in val_loader:
                net(x)
