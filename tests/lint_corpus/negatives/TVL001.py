"""zero_grad at the start, before backward, after step; GAN optimizers; accumulation."""


def zero_at_end(model, loader, optimizer, criterion):
    for x, y in loader:
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def zero_before_backward(model, loader, optimizer, criterion):
    for x, y in loader:
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def gan(netG, netD, opt_g, opt_d, loader, bce):
    for real, _ in loader:
        opt_d.zero_grad()
        loss_d = bce(netD(real), 1) + bce(netD(netG(real).detach()), 0)
        loss_d.backward()
        opt_d.step()
        opt_g.zero_grad()  # after D's backward, but G's own backward comes next
        loss_g = bce(netD(netG(real)), 1)
        loss_g.backward()
        opt_g.step()


def accumulate(model, loader, optimizer, criterion, k=4):
    for i, (x, y) in enumerate(loader):
        (criterion(model(x), y) / k).backward()
        if (i + 1) % k == 0:
            optimizer.step()
            optimizer.zero_grad()
