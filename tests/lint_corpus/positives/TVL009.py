import torch


def predict_file(model, path, x):
    model.load_state_dict(torch.load(path, weights_only=True))
    with torch.no_grad():
        return model(x).argmax(1)  # expect: TVL009


def main(net, ckpt, batches):
    net.load_state_dict(ckpt["model"])
    preds = []
    for b in batches:
        preds.append(net(b))  # expect: TVL009
    return preds


class Predictor:
    def load_and_predict(self, state, x):
        self.model.load_state_dict(state)
        return self.model(x).softmax(-1)  # expect: TVL009
