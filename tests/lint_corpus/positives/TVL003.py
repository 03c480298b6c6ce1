def train_a(model, loader, optimizer, criterion):
    for x, y in loader:
        optimizer.step()  # expect: TVL003
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()


def train_b(net, data, opt):
    for epoch in range(3):
        for x, y in data:
            opt.zero_grad()
            opt.step()  # expect: TVL003
            out = net(x)
            out.sum().backward()


def train_c(model, batches, optimizer):
    i = 0
    while i < len(batches):
        optimizer.step()  # expect: TVL003
        optimizer.zero_grad()
        model(batches[i]).mean().backward()
        i += 1
