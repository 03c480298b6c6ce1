def train_a(model, loader, optimizer, criterion):
    total = 0.0
    for x, y in loader:
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        total += loss.item()  # expect: TVL010


def train_b(model, loader, opt, loss_fn, log):
    for x, y in loader:
        opt.zero_grad()
        out = model(x)
        loss = loss_fn(out, y)
        loss.backward()
        opt.step()
        log.append(out.argmax(1).cpu())  # expect: TVL010


def train_c(net, loader, opt):
    for x, y in loader:
        opt.zero_grad()
        loss = net(x).mean()
        loss.backward()
        opt.step()
        print(loss.detach().numpy())  # expect: TVL010
