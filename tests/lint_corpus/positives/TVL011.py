def epoch_a(model, train_loader, criterion):
    train_loss = 0.0
    for x, y in train_loader:
        train_loss += criterion(model(x), y).item()
    return train_loss / len(train_loader)  # expect: TVL011


def epoch_b(model, val_loader, criterion):
    val_loss = 0.0
    for x, y in val_loader:
        val_loss += criterion(model(x), y).item()
    print(f"loss: {val_loss / len(val_loader):.4f}")  # expect: TVL011


def epoch_c(model, loader, loss_fn):
    loss_sum = sum(loss_fn(model(x), y).item() for x, y in loader)
    mean = loss_sum / len(loader)  # expect: TVL011
    return mean
