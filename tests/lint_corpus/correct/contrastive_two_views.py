"""Self-supervised two-view training with a projection head and a linear-probe evaluation."""
import torch
from torch import nn


def nt_xent(z1, z2, temperature=0.5):
    z = nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.t() / temperature
    n = z1.size(0)
    sim.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return nn.functional.cross_entropy(sim, targets)


def pretrain(encoder, projector, loader, augment, epochs=100):
    params = list(encoder.parameters()) + list(projector.parameters())
    optimizer = torch.optim.SGD(params, lr=0.3, momentum=0.9, weight_decay=1e-6)
    for epoch in range(epochs):
        encoder.train()
        projector.train()
        for x, _ in loader:
            z1, z2 = projector(encoder(augment(x))), projector(encoder(augment(x)))
            loss = nt_xent(z1, z2)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


@torch.no_grad()
def embed(encoder, loader):
    encoder.eval()
    feats, labels = [], []
    for x, y in loader:
        feats.append(encoder(x))
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)
