"""Student/teacher with an EMA teacher updated under no_grad."""
import copy

import torch
from torch import nn


@torch.no_grad()
def update_teacher(teacher, student, decay=0.999):
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(decay).add_(s.detach(), alpha=1 - decay)


def train(student, loader, val_loader, epochs=10):
    teacher = copy.deepcopy(student)
    teacher.eval()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    ce = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        student.train()
        for x, y in loader:
            with torch.no_grad():
                soft = teacher(x).softmax(-1)
            logits = student(x)
            loss = ce(logits, y) + nn.functional.kl_div(logits.log_softmax(-1), soft, reduction="batchmean")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            update_teacher(teacher, student)
        student.eval()
        with torch.no_grad():
            acc = sum((teacher(x).argmax(1) == y).sum().item() for x, y in val_loader)
        print(epoch, acc / len(val_loader.dataset))
