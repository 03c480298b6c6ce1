import torch


def restore_unsafe(path):
    return torch.load(path, weights_only=False)  # expect: TVL012


def restore_unsafe_cpu(model, path):
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["model"])  # expect: TVL012


class Resumer:
    def load(self, path):
        self.state = torch.load(path, False, weights_only=False)  # expect: TVL012
