"""Course-homework style: a phoneme classifier with train/val, best checkpoint, predictions file."""
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

device = "cuda" if torch.cuda.is_available() else "cpu"


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(429, 1024), nn.BatchNorm1d(1024), nn.ReLU(), nn.Dropout(0.25),
                                    nn.Linear(1024, 39))

    def forward(self, x):
        return self.layers(x)


def main():
    x = np.load("train_11.npy")
    y = np.load("train_label_11.npy").astype(np.int64)
    split = int(len(x) * 0.8)
    train_loader = DataLoader(TensorDataset(torch.from_numpy(x[:split]), torch.from_numpy(y[:split])), batch_size=64, shuffle=True)
    val_loader = DataLoader(TensorDataset(torch.from_numpy(x[split:]), torch.from_numpy(y[split:])), batch_size=64)
    model = Classifier().to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    best_acc = 0.0
    for epoch in range(20):
        model.train()
        train_correct = 0
        for features, labels in train_loader:
            features, labels = features.to(device), labels.to(device)
            optimizer.zero_grad()
            outputs = model(features)
            batch_loss = criterion(outputs, labels)
            batch_loss.backward()
            optimizer.step()
            train_correct += (outputs.argmax(1) == labels).sum().item()
        model.eval()
        val_correct = 0
        with torch.no_grad():
            for features, labels in val_loader:
                outputs = model(features.to(device))
                val_correct += (outputs.argmax(1).cpu() == labels).sum().item()
        val_acc = val_correct / len(val_loader.dataset)
        print(f"[{epoch + 1:03d}/020] Train Acc: {train_correct / len(train_loader.dataset):.6f} | Val Acc: {val_acc:.6f}")
        if val_acc > best_acc:
            best_acc = val_acc
            torch.save(model.state_dict(), "model.ckpt")

    model = Classifier().to(device)
    model.load_state_dict(torch.load("model.ckpt", map_location=device, weights_only=True))
    model.eval()
    test = torch.from_numpy(np.load("test_11.npy"))
    with torch.no_grad():
        preds = model(test.to(device)).argmax(1).cpu().numpy()
    with open("prediction.csv", "w") as f:
        f.write("Id,Class\n")
        for i, p in enumerate(preds):
            f.write(f"{i},{p}\n")


if __name__ == "__main__":
    main()
