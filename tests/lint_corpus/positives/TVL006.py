def evaluate(model, loader):
    model.eval()
    correct = 0
    for x, y in loader:
        correct += (model(x).argmax(1) == y).sum().item()  # expect: TVL006
    return correct


def predict(net, xs):
    net.eval()
    return [net(x) for x in xs]  # expect: TVL006


class Experiment:
    def validate(self, loader):
        self.model.eval()
        losses = []
        for x, y in loader:
            losses.append(self.criterion(self.model(x), y).item())  # expect: TVL006
        return losses
