"""Every task through the public API: metrics equal scikit-learn's on best.pt's predictions, exact epoch
losses for weighted / ignore_index / label-smoothing losses, batches and outputs of every accepted form,
fine-tuning with frozen BatchNorm, and one clear error for each input that cannot work."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from conftest import make_blobs, tiny_mlp
from sklearn import metrics as skm
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from trainval import Callback, Trainer
from trainval.errors import ConfigError, DataError


def fit(model, loss_fn, train, val, tmp_path, lr=0.02, **kw):
    kw.setdefault("max_epochs", 3)
    kw.setdefault("plot", False)
    tr = Trainer(model, torch.optim.Adam(model.parameters(), lr=lr), loss_fn, out_dir=str(tmp_path), progress=False,
                 **kw)
    tr.fit(train, val)
    return tr


# --------------------------------------------------------------------------------------------------
# Metrics against scikit-learn, on the predictions of best.pt, with a short last batch


def test_multiclass_every_metric_equals_sklearn(tmp_path):
    X, y = make_blobs(n=230, classes=5, spread=2.5)  # overlapping: errors in every class
    y[y == 4] = 3  # class 4 occurs nowhere: scikit-learn averages over the labels that occur
    y[::17] = -100  # ignored targets: in no loss and no metric
    names = ["acc", "top2_acc", "f1_macro", "f1_micro", "f1_weighted", "precision_macro", "recall_macro",
             "balanced_acc", "miou"]
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0]), label_smoothing=0.1)
    tr = fit(tiny_mlp(classes=5), loss_fn, (X[:150], y[:150]), (X[150:], y[150:]), tmp_path, metrics=names,
             batch_size=32, eval_batch_size=7, monitor="val_f1_macro")
    res = tr.test((X[150:], y[150:]))
    keep = y[150:] != -100
    yt, proba = y[150:][keep].numpy(), tr.predict_proba(X[150:])[keep]
    yp = proba.argmax(1).numpy()
    labels = np.union1d(yt, yp)
    expected = {
        "acc": skm.accuracy_score(yt, yp),
        "top2_acc": skm.top_k_accuracy_score(yt, proba.numpy(), k=2, labels=range(5)),
        "f1_macro": skm.f1_score(yt, yp, average="macro", zero_division=0),
        "f1_micro": skm.f1_score(yt, yp, average="micro", zero_division=0),
        "f1_weighted": skm.f1_score(yt, yp, average="weighted", zero_division=0),
        "precision_macro": skm.precision_score(yt, yp, average="macro", zero_division=0),
        "recall_macro": skm.recall_score(yt, yp, average="macro", zero_division=0),
        "balanced_acc": skm.balanced_accuracy_score(yt, yp),
        "miou": skm.jaccard_score(yt, yp, average="macro", labels=labels, zero_division=0),
    }
    assert 0.2 < expected["acc"] < 1.0  # a case where the metrics differ from each other
    for name, value in expected.items():
        assert res[f"test_{name}"] == pytest.approx(value, abs=1e-12), name
    # the epoch loss is the whole split's loss at once (class weights, ignore_index, label smoothing)
    with torch.no_grad():
        whole = loss_fn(tr.model.eval()(X[150:]), y[150:]).item()
    assert res["test_loss"] == pytest.approx(whole, rel=1e-6)
    assert tr.monitor == "val_f1_macro" and tr.mode == "max"
    best = max(r["val_f1_macro"] for r in tr.history)
    assert tr.best_value == best and tr.history[tr.best_epoch - 1]["val_f1_macro"] == best
    # the confusion matrix is in the run folder, rows = true class
    with open(tmp_path / "confusion_matrix.csv") as f:
        cm = np.array([[int(v) for v in row[1:]] for row in list(csv.reader(f))[1:]])
    assert np.array_equal(cm, skm.confusion_matrix(yt, yp, labels=range(5)))


def test_epoch_loss_does_not_depend_on_the_batch_size(tmp_path):
    """The issue's repro: a weighted, smoothed cross-entropy's test loss at eval batch 500 / 64 / 7."""
    X, y = make_blobs(n=300, classes=3, spread=2.0)
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([0.2, 1.0, 3.0]), label_smoothing=0.1)
    losses = []
    for bs in (500, 64, 7):
        model = tiny_mlp()
        tr = Trainer(model, loss_fn=loss_fn, max_epochs=1, eval_batch_size=bs, out_dir=str(tmp_path / str(bs)),
                     progress=False, plot=False)
        losses.append(tr.test((X, y), ckpt=None)["test_loss"])
    with torch.no_grad():
        whole = loss_fn(tiny_mlp()(X), y).item()
    assert losses == pytest.approx([whole] * 3, rel=1e-6)
    # the control: the mean of batch means (what a hand loop reports) differs at batch size 7
    with torch.no_grad():
        model = tiny_mlp()
        means = [loss_fn(model(X[i:i + 7]), y[i:i + 7]).item() for i in range(0, 300, 7)]
    sizes = [len(y[i:i + 7]) for i in range(0, 300, 7)]
    assert abs(np.average(means, weights=sizes) - whole) > 1e-3


def test_segmentation_dense_multiclass_with_ignore_index(tmp_path):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 3, 6, 6, generator=g)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 1).long()  # 3 classes per pixel
    y[:, 0, :] = 255  # a border the loss and the metrics ignore
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1))
    tr = fit(model, nn.CrossEntropyLoss(ignore_index=255), (X[:30], y[:30]), (X[30:], y[30:]), tmp_path,
             metrics=["acc", "miou", "f1_macro"], batch_size=8, eval_batch_size=3)
    res = tr.test((X[30:], y[30:]))
    pred = tr.predict(X[30:])
    assert pred.shape == (10, 6, 6) and pred.dtype == torch.int64
    keep = (y[30:] != 255).reshape(-1)
    yt, yp = y[30:].reshape(-1)[keep].numpy(), pred.reshape(-1)[keep].numpy()
    assert res["test_acc"] == pytest.approx(skm.accuracy_score(yt, yp), abs=1e-12)
    assert res["test_miou"] == pytest.approx(skm.jaccard_score(yt, yp, average="macro", labels=np.union1d(yt, yp)),
                                             abs=1e-12)
    assert res["test_f1_macro"] == pytest.approx(skm.f1_score(yt, yp, average="macro"), abs=1e-12)
    assert tr.predict_proba(X[30:32]).shape == (2, 3, 6, 6)


@pytest.mark.parametrize("two_logits", [False, True])
def test_binary_equals_sklearn(tmp_path, two_logits):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(203, 5, generator=g)
    y = (X[:, 0] + X[:, 1] + torch.randn(203, generator=g) > 0.3).long()
    torch.manual_seed(0)
    width = 2 if two_logits else 1
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, width))
    loss_fn = nn.CrossEntropyLoss() if two_logits else nn.BCEWithLogitsLoss(pos_weight=torch.tensor(2.0))
    tr = fit(model, loss_fn, (X[:140], y[:140]), (X[140:], y[140:]), tmp_path, batch_size=32, eval_batch_size=9,
             task="binary", metrics=["acc", "f1", "precision", "recall", "auroc"], monitor="val_auroc")
    res = tr.test((X[140:], y[140:]))
    yt, p = y[140:].numpy(), tr.predict_proba(X[140:]).numpy()
    yp = tr.predict(X[140:]).numpy()
    assert set(np.unique(yp)) <= {0, 1} and p.shape == (63,)
    assert np.array_equal(yp, (p > 0.5).astype(int))
    assert res["test_acc"] == pytest.approx(skm.accuracy_score(yt, yp), abs=1e-12)
    assert res["test_f1"] == pytest.approx(skm.f1_score(yt, yp, zero_division=0), abs=1e-12)
    assert res["test_precision"] == pytest.approx(skm.precision_score(yt, yp, zero_division=0), abs=1e-12)
    assert res["test_recall"] == pytest.approx(skm.recall_score(yt, yp, zero_division=0), abs=1e-12)
    assert res["test_auroc"] == pytest.approx(skm.roc_auc_score(yt, p), abs=1e-12)
    assert 0.5 < res["test_auroc"] < 1.0
    with torch.no_grad():
        out = tr.model.eval()(X[140:])
        whole = loss_fn(out, y[140:]) if two_logits else loss_fn(out[:, 0], y[140:].float())
    assert res["test_loss"] == pytest.approx(whole.item(), rel=1e-6)


def test_auroc_with_ties_equals_sklearn():
    from trainval.metrics import _auroc

    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 300) / 4.0  # many ties
    target = (rng.random(300) < 0.4).astype(float)
    assert _auroc(np.stack([scores, target], 1)) == pytest.approx(skm.roc_auc_score(target, scores), abs=1e-12)


def test_multilabel_equals_sklearn(tmp_path):
    g = torch.Generator().manual_seed(2)
    X = torch.randn(190, 6, generator=g)
    y = (X[:, :4] + 0.8 * torch.randn(190, 4, generator=g) > 0.2).long()
    y[:, 3] = 0  # a label that never occurs: scikit-learn still averages over it
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    tr = fit(model, nn.BCEWithLogitsLoss(), (X[:130], y[:130]), (X[130:], y[130:]), tmp_path, batch_size=16,
             eval_batch_size=11, metrics=["f1_micro", "f1_macro", "exact_match"])
    assert tr.task.name == "multilabel" and tr.monitor == "val_f1_micro"
    res = tr.test((X[130:], y[130:]))
    yt, yp = y[130:].numpy(), tr.predict(X[130:]).numpy()
    assert yp.shape == (60, 4) and np.array_equal(yp, (tr.predict_proba(X[130:]).numpy() > 0.5).astype(int))
    assert res["test_f1_micro"] == pytest.approx(skm.f1_score(yt, yp, average="micro", zero_division=0), abs=1e-12)
    assert res["test_f1_macro"] == pytest.approx(skm.f1_score(yt, yp, average="macro", zero_division=0), abs=1e-12)
    assert res["test_exact_match"] == pytest.approx(skm.accuracy_score(yt, yp), abs=1e-12)


def test_notes_regression_example(tmp_path):
    """The notes' regression loop: nn.MSELoss, a [5 -> 1000 -> 2] model, float targets [N, 2]."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(1000, 5, generator=g)
    Y = torch.stack([X.sum(1), 2 * X[:, 0] - X[:, 2]], 1) + 0.1 * torch.randn(1000, 2, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 1000), nn.Linear(1000, 2))
    tr = fit(model, nn.MSELoss(), (X[:700], Y[:700]), (X[700:], Y[700:]), tmp_path, batch_size=64,
             eval_batch_size=33, metrics=["mse", "rmse", "mae", "r2"], max_epochs=4)
    assert tr.task.name == "regression" and tr.monitor == "val_mse" and tr.mode == "min"
    res = tr.test((X[700:], Y[700:]))
    pred = tr.predict(X[700:]).numpy().astype(np.float64)  # trainval sums in float64; so does this reference
    yt = Y[700:].numpy().astype(np.float64)
    assert pred.shape == (300, 2)
    assert res["test_mse"] == pytest.approx(skm.mean_squared_error(yt, pred), rel=1e-9)
    assert res["test_rmse"] == pytest.approx(skm.root_mean_squared_error(yt, pred), rel=1e-9)
    assert res["test_mae"] == pytest.approx(skm.mean_absolute_error(yt, pred), rel=1e-9)
    assert res["test_r2"] == pytest.approx(skm.r2_score(yt, pred), rel=1e-9)
    assert res["test_loss"] == pytest.approx(res["test_mse"], rel=1e-5) and res["test_r2"] > 0.9
    with pytest.raises(DataError, match="classification tasks"):
        tr.predict_proba(X[:3])


def test_regression_one_output_is_matched_not_broadcast(tmp_path):
    X = torch.randn(80, 3, generator=torch.Generator().manual_seed(0))
    y = X[:, 0] * 3  # [N] targets, a [B, 1] output: MSELoss would broadcast to [B, B]
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    tr = fit(model, nn.MSELoss(), (X, y), (X, y), tmp_path, max_epochs=30, batch_size=16, lr=0.1)
    assert tr.history[-1]["val_mse"] < 0.05  # broadcasting would have left it near var(y) = 9
    with torch.no_grad():
        assert tr.history[-1]["val_loss"] == pytest.approx(nn.functional.mse_loss(model(X)[:, 0], y).item(), rel=1e-5)


# --------------------------------------------------------------------------------------------------
# Batches and outputs


class TextDataset(Dataset):
    """Hugging Face style: dict samples of different lengths, padded by the collate function."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            length = int(torch.randint(3, 9, (1,), generator=g))
            ids = torch.randint(1, 20, (length,), generator=g)
            self.items.append({"input_ids": ids, "labels": int((ids > 10).sum() > length / 2)})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def pad_collate(samples):
    width = max(len(s["input_ids"]) for s in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    mask = torch.zeros(len(samples), width, dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, : len(s["input_ids"])] = s["input_ids"]
        mask[i, : len(s["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([s["labels"] for s in samples])}


class TinyTextModel(nn.Module):
    """Returns a dict with "logits" (and a hidden state), like a transformers ModelOutput."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(20, 16), nn.Linear(16, 2)

    def forward(self, input_ids, attention_mask):
        h = (self.embed(input_ids) * attention_mask.unsqueeze(-1)).sum(1) / attention_mask.sum(1, keepdim=True)
        return {"logits": self.head(h), "hidden": h}


def test_hugging_face_style_dict_batches_and_outputs(tmp_path):
    torch.manual_seed(0)
    train = DataLoader(TextDataset(150, 0), batch_size=16, shuffle=True, collate_fn=pad_collate)
    val = DataLoader(TextDataset(61, 1), batch_size=8, collate_fn=pad_collate)
    tr = fit(TinyTextModel(), nn.CrossEntropyLoss(), train, val, tmp_path, metrics=["acc", "f1_macro"],
             monitor="val_f1_macro", max_epochs=4)
    res = tr.test(val)
    preds = tr.predict(val)
    yt = np.array([s["labels"] for s in val.dataset.items])
    assert len(preds) == 61
    assert res["test_f1_macro"] == pytest.approx(skm.f1_score(yt, preds.numpy(), average="macro"), abs=1e-12)
    assert res["test_acc"] > 0.6


def test_tuple_inputs_tuple_outputs_and_in_memory_dicts(tmp_path):
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(2, 3)

        def forward(self, xa, xb):
            return self.a(xa) + self.b(xb), "aux"  # (prediction, anything)

    X, y = make_blobs(n=90, d=5)
    torch.manual_seed(0)
    tr = fit(TwoInputs(), None, ((X[:, :3], X[:, 3:]), y), ((X[:, :3], X[:, 3:]), y), tmp_path / "t")
    assert tr.history[-1]["val_acc"] > 0.5
    # unlabelled tuple inputs: (inputs, None), since a bare pair of tensors reads as (X, y)
    assert tr.predict(((X[:, :3], X[:, 3:]), None)).shape == (90,)

    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3)

        def forward(self, features):
            return {"scores": self.lin(features)}

    torch.manual_seed(0)
    data = {"features": X, "target": y}
    tr = fit(Named(), None, data, data, tmp_path / "d", target_key="target", output_key="scores")
    assert tr.history[-1]["val_acc"] > 0.5
    with pytest.raises(DataError, match="'logits'"):
        fit(Named(), None, data, data, tmp_path / "e", target_key="target")


def test_bad_batch_and_output_forms_are_one_clear_error(tmp_path):
    X, y = make_blobs(n=40)
    three = DataLoader(torch.utils.data.TensorDataset(X, y, y), batch_size=8)
    with pytest.raises(DataError, match="sequence of 3 items"):
        fit(tiny_mlp(), None, three, None, tmp_path / "a", monitor="train_loss")

    class Weird(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return {1, 2}

    with pytest.raises(DataError, match="returned set"):
        fit(Weird(), None, (X, y), None, tmp_path / "b", monitor="train_loss")


# --------------------------------------------------------------------------------------------------
# Monitor, callbacks' columns, fine-tuning


def test_monitor_choices_and_callback_columns(tmp_path):
    X, y = make_blobs(n=60)
    with pytest.raises(ConfigError, match="choose one of val_loss, val_acc, train_loss, train_acc"):
        fit(tiny_mlp(), None, (X, y), (X, y), tmp_path / "a", monitor="val_f1")

    class AddsColumn(Callback):
        def on_epoch_end(self, trainer, row):
            row["val_margin"] = 1.0 - row["val_acc"]

    tr = fit(tiny_mlp(), None, (X, y), (X, y), tmp_path / "b", callbacks=[AddsColumn()], plot=True)
    with open(tmp_path / "b" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert "val_margin" in rows[0] and float(rows[-1]["val_margin"]) == pytest.approx(1 - tr.history[-1]["val_acc"])
    assert (tmp_path / "b" / "curves.png").stat().st_size > 1000
    tr = fit(tiny_mlp(), None, (X, y), (X, y), tmp_path / "c", monitor="val_loss")
    assert tr.mode == "min"


class Recorder(Callback):
    """Records the BatchNorm layer's mode at each training step; at on_epoch_start, freezes the backbone."""

    def __init__(self, freeze):
        self.freeze, self.bn_modes = freeze, []

    def on_epoch_start(self, trainer, epoch):
        if self.freeze:
            for p in trainer.model[0:2].parameters():
                p.requires_grad_(False)

    def on_train_batch_end(self, trainer, i):
        self.bn_modes.append(trainer.model[1].training)


@pytest.mark.parametrize("switch", [True, False])
def test_frozen_batchnorm_keeps_its_statistics(tmp_path, switch):
    X, y = make_blobs(n=64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    before = model[1].running_mean.clone()
    rec = Recorder(freeze=True)
    fit(model, None, (X, y), (X, y), tmp_path, callbacks=[rec], eval_frozen_batchnorm=switch, batch_size=16)
    if switch:  # frozen by a callback at on_epoch_start (after the loop's train()): eval mode, stats kept
        assert not any(rec.bn_modes) and torch.equal(model[1].running_mean, before)
    else:  # the control: without the rule the frozen layer's statistics drift
        assert all(rec.bn_modes) and not torch.equal(model[1].running_mean, before)
    assert model[1].training  # modes restored after fit


def test_trainable_batchnorm_trains_in_training_mode(tmp_path):
    X, y = make_blobs(n=64)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    rec = Recorder(freeze=False)
    fit(model, None, (X, y), (X, y), tmp_path, callbacks=[rec], batch_size=16)
    assert rec.bn_modes and all(rec.bn_modes)


# --------------------------------------------------------------------------------------------------
# One clear error for each input that cannot work (issue 12, item 8 among them)


class Stream(IterableDataset):
    """``n`` samples; ``dict_from``: the samples from there on come as dicts; ``once``: one pass, ever."""

    def __init__(self, n=10, dict_from=None, once=False):
        self.n, self.dict_from = n, dict_from
        self.items = self._items() if once else None

    def _items(self):
        X, y = torch.randn(self.n, 6), torch.arange(self.n) % 3
        for i in range(self.n):
            yield {"x": X[i], "labels": y[i]} if self.dict_from is not None and i >= self.dict_from else (X[i], y[i])

    def __iter__(self):
        return self.items if self.items is not None else self._items()


def test_clear_errors(tmp_path):
    X, y = make_blobs(n=40)
    m = tiny_mlp()
    cases = [
        (lambda: Trainer(m, loss_fn=nn.CosineEmbeddingLoss()), ConfigError, "task='multiclass'"),
        (lambda: Trainer(m, loss_fn=nn.CrossEntropyLoss(reduction="none")), ConfigError, "reduction='mean'"),
        (lambda: Trainer(m, grad_clip=-1.0), ConfigError, "grad_clip must be a positive number"),
        (lambda: Trainer(m, torch.optim.SGD(tiny_mlp(seed=1).parameters(), lr=0.1)), ConfigError, "not the model's"),
        (lambda: Trainer(m, device="banana"), ConfigError, "not a device"),
        (lambda: Trainer(m, task="ranking"), ConfigError, "task must be one of"),
        (lambda: Trainer(m, metrics=["f1"]), ConfigError, "unknown metric 'f1' for task multiclass"),
        (lambda: Trainer(m, metrics="acc"), ConfigError, "write \\['acc'\\]"),
    ]
    for make, error, match in cases:
        with pytest.raises(error, match=match):
            make()

    def run(train, model=None, **kw):
        Trainer(model or tiny_mlp(), out_dir=str(tmp_path), progress=False, plot=False, overwrite=True,
                monitor="train_loss", **kw).fit(train)

    data_cases = [
        (lambda: run(Stream(n=0)), "the train stream yielded no samples; check the dataset's __iter__"),
        (lambda: run(Stream(dict_from=5)), "the train stream yielded samples of different structures: sample 0 is "
                                           "\\(\\[6\\], \\[\\]\\), sample 5 is \\{'x': \\[6\\], 'labels': \\[\\]\\}"),
        (lambda: run(Stream(dict_from=5), batch_size=5), "the train stream yielded batches of different structures: "
                                                         "batch 0 is \\(\\[5, 6\\], \\[5\\]\\), batch 1 is \\{"),
        (lambda: run(Stream(once=True)), "the train stream yielded no batches in this epoch; its __iter__ must start"),
        (lambda: run((torch.complex(X, X), y)), "complex"),
        (lambda: run((np.array([["a"] * 6] * 40), y.numpy())), "strings"),
        (lambda: run((X, torch.zeros(40, dtype=torch.long))), "single class"),
        (lambda: run((X[:0], y[:0])), "empty"),
        (lambda: run((X, y), model=nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)),
                     batch_size=13), "1 sample"),
        (lambda: run((X, y.float()), task="regression"), "output is \\[2, 3\\]"),
        (lambda: run((X, torch.randint(0, 3, (40,))), model=nn.Linear(6, 1), task="binary"), "0 or 1; sample"),
        (lambda: run((X, y), model=nn.Linear(6, 1)), "C >= 2 classes"),
        (lambda: run((X, (y[:, None] == torch.arange(3)).long()), loss_fn=nn.BCEWithLogitsLoss(), model=nn.Linear(6, 4)),
         "targets have shape \\[2, 3\\] but the model.s logits are \\[2, 4\\]"),
    ]
    for make, match in data_cases:
        with pytest.raises(DataError, match=match):
            make()
    # and what works: float16 features on a float32 model, N=2
    run((X.half(), y))
    run((X[:2], torch.tensor([0, 1])))


def test_grad_clip_validated_and_bad_monitor_name():
    with pytest.raises(ConfigError, match="grad_clip"):
        Trainer(tiny_mlp(), grad_clip=math.nan)
    with pytest.raises(ConfigError, match="monitor must be"):
        Trainer(tiny_mlp(), monitor="acc")


# --------------------------------------------------------------------------------------------------
# Users' own metrics: the documented protocol, and torchmetrics objects


class MeanAbsLogit:
    """The example of trainval.metrics' docstring."""

    name = "mean_abs_logit"
    higher_is_better = False

    def state_shape(self, num_outputs):
        return (2,)

    def update(self, state, out):
        state[0] += out.output.abs().sum()
        state[1] += out.output.numel()

    def compute(self, state):
        return float(state[0] / state[1])


def test_custom_metric_protocol(tmp_path):
    X, y = make_blobs(n=70)
    tr = fit(tiny_mlp(), None, (X, y), (X, y), tmp_path, metrics=["acc", MeanAbsLogit()], batch_size=16,
             monitor="val_mean_abs_logit")
    assert tr.mode == "min"  # the metric's direction
    res = tr.test((X, y))
    with torch.no_grad():
        expected = tr.model.eval()(X).abs().mean().item()
    assert res["test_mean_abs_logit"] == pytest.approx(expected, rel=1e-6)
    with open(tmp_path / "metrics.csv") as f:
        assert "val_mean_abs_logit" in next(csv.reader(f))


def test_torchmetrics_objects_are_accepted(tmp_path):
    torchmetrics = pytest.importorskip("torchmetrics")
    X, y = make_blobs(n=70, spread=2.0)
    tm = torchmetrics.classification.MulticlassF1Score(num_classes=3, average="macro")
    tr = fit(tiny_mlp(), None, (X, y), (X, y), tmp_path, metrics={"acc": "acc", "tm_f1": tm}, batch_size=16)
    res = tr.test((X, y))
    yp = tr.predict(X).numpy()
    assert res["test_tm_f1"] == pytest.approx(skm.f1_score(y.numpy(), yp, average="macro"), abs=1e-6)
    # (a torchmetrics object not reset between epochs and splits would have mixed every epoch into this value)


def test_default_losses_per_task(tmp_path):
    X, y = make_blobs(n=60, classes=2)
    for width, expected in ((1, nn.BCEWithLogitsLoss), (2, nn.CrossEntropyLoss)):
        tr = fit(nn.Linear(6, width), None, (X, y), (X, y), tmp_path / str(width), task="binary", max_epochs=10)
        assert isinstance(tr.loss_fn, expected) and tr.history[-1]["val_acc"] > 0.8
    tr = fit(nn.Linear(6, 1), None, (X, y.float()), (X, y.float()), tmp_path / "r", task="regression")
    assert isinstance(tr.loss_fn, nn.MSELoss)


def test_dataset_targets_ignored_after_the_first_samples(tmp_path):
    """The pre-flight sees two samples; ignored targets further on must still count nowhere."""
    X, y = make_blobs(n=90, spread=2.0)
    y[10::7] = -100
    ds = torch.utils.data.TensorDataset(X, y)
    tr = fit(tiny_mlp(), None, ds, ds, tmp_path, metrics=["acc", "f1_macro"], batch_size=16)
    res = tr.test(ds)
    keep = y != -100
    yp = tr.predict(X).numpy()[keep.numpy()]
    yt = y[keep].numpy()
    assert res["test_acc"] == pytest.approx(skm.accuracy_score(yt, yp), abs=1e-12)
    assert res["test_f1_macro"] == pytest.approx(skm.f1_score(yt, yp, average="macro"), abs=1e-12)
    with torch.no_grad():
        assert res["test_loss"] == pytest.approx(nn.functional.cross_entropy(tr.model.eval()(X), y).item(), rel=1e-6)
