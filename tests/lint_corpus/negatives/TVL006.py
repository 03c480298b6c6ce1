"""no_grad by decorator, by block, at every call site; inference_mode; a function that trains."""
import torch


@torch.no_grad()
def evaluate(model, loader):
    model.eval()
    return [model(x) for x, _ in loader]


def validate(model, loader):
    model.eval()
    with torch.inference_mode():
        return [model(x) for x, _ in loader]


def predict_batch(model, x):
    model.eval()
    return model(x).argmax(1)


def run(model, batches):
    with torch.no_grad():
        return [predict_batch(model, b) for b in batches]


def test_time_adaptation(model, loader, opt):
    model.eval()
    for x, _ in loader:
        opt.zero_grad()
        model(x).entropy().backward()
        opt.step()
