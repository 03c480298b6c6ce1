"""eval() after loading, loading to resume training, loading then a helper that sets eval()."""
import torch


def predict_file(model, path, x):
    model.load_state_dict(torch.load(path, weights_only=True))
    model.eval()
    with torch.no_grad():
        return model(x).argmax(1)


def resume(model, path, loader, opt, criterion):
    model.load_state_dict(torch.load(path, weights_only=True)["model"])
    model.train()
    for x, y in loader:
        opt.zero_grad()
        criterion(model(x), y).backward()
        opt.step()


@torch.no_grad()
def predict(model, xs):
    model.eval()
    return [model(x) for x in xs]


def load_and_predict(model, state, xs):
    model.load_state_dict(state)
    return predict(model, xs)
