"""item()/detach() accumulation, a sum of losses within one iteration, intentional graph accumulation."""


def with_item(model, loader, optimizer, criterion):
    total = 0.0
    for x, y in loader:
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        total += loss.item()
    return total


def with_detach(model, loader, optimizer, criterion):
    total = 0
    for x, y in loader:
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        total += loss.detach() * len(y)
    return total


def multi_loss(model, loader, optimizer, criterion, reg):
    for x, y in loader:
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        loss = loss + reg(model)
        loss.backward()
        optimizer.step()


def chunked(model, chunks, optimizer, criterion):
    for batch in chunks:
        optimizer.zero_grad()
        total = 0
        for x, y in batch:
            loss = criterion(model(x), y)
            total += loss
        total.backward()
        optimizer.step()
