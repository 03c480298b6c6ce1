"""Inference only: load weights safely, eval mode, inference_mode, write a CSV."""
import csv

import torch


def predict_to_csv(build_model, checkpoint_path, loader, out_path):
    model = build_model()
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    model.eval()
    rows = []
    with torch.inference_mode():
        for batch in loader:
            rows += model(batch).argmax(dim=1).tolist()
    with open(out_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Id", "Class"])
        writer.writerows(enumerate(rows))
