"""Rules that decide by data flow (issue 13): each false-positive pattern stays quiet, and each control
(the same code with the mistake) is reported at the right line."""

from __future__ import annotations

import textwrap

import pytest

from trainval.lint.cli import lint_source
from trainval.lint.rules import RULES

DEFAULT = {c for c, r in RULES.items() if r.default}


def found(source: str, codes=None) -> set[tuple[int, str]]:
    return {(f.line, f.code) for f in lint_source(textwrap.dedent(source), "case.py", codes or DEFAULT)}


def line_of(source: str, needle: str) -> int:
    lines = textwrap.dedent(source).splitlines()
    return next(i for i, line in enumerate(lines, 1) if needle in line)


TRAIN_LOOP = """
    for x, y in loader:
        opt.zero_grad()
        loss = crit(model(x), y)
        loss.backward()
        opt.step()
        total += {acc}
"""


@pytest.mark.parametrize(
    "acc, reported",
    [
        ("loss.data[0]", False),
        ("loss.data", False),
        ("loss.item()", False),
        ("float(loss)", False),
        ("loss.detach().cpu()", False),
        ("loss", True),
        ("loss.cpu()", True),
    ],
)
def test_tvl007_detached_reads(acc, reported):
    src = TRAIN_LOOP.format(acc=acc)
    assert ((line_of(src, "total +="), "TVL007") in found(src)) is reported


GAN_RESUME = """
import torch
netD.load_state_dict(torch.load(path, weights_only=True))
{eval_line}
for real in loader:
    optD.zero_grad()
    out = netD(real)
    errD = crit(out, ones)
    errD.backward()
    optD.step()
"""


def test_tvl009_model_reloaded_then_trained_is_quiet():
    assert found(GAN_RESUME.format(eval_line="")) == set()


INFER = """
import torch
model = Net(){chain}
model.load_state_dict(torch.load(path, weights_only=True))
with torch.no_grad():
    preds = model(x).argmax(1)
print(preds)
"""


def test_tvl009_eval_before_load_is_quiet_and_control_is_reported():
    assert found(INFER.format(chain=".eval()")) == set()
    assert found(INFER.format(chain=".to(device).eval()")) == set()
    src = INFER.format(chain="")
    assert found(src) == {(line_of(src, "preds = model(x)"), "TVL009")}


PROBE = """
import torch
def train(backbone, head, loader, opt):
    backbone.eval()  # frozen features: BatchNorm statistics stay fixed on purpose
    head.train()
    for x, y in loader:
        with torch.no_grad():
            feats = backbone(x)
        loss = crit(head(feats), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

@torch.no_grad()
def validate(backbone, head, loader):
    backbone.eval()
    {head_eval}
    return sum((head(backbone(x)).argmax(1) == y).sum().item() for x, y in loader)

def main(backbone, head, train_loader, val_loader, opt):
    for epoch in range(10):
        train(backbone, head, train_loader, opt)
        validate(backbone, head, val_loader)
"""


def test_tvl005_linear_probe_keeps_backbone_in_eval_on_purpose():
    assert found(PROBE.format(head_eval="head.eval()")) == set()


def test_tvl005_control_trained_model_left_in_eval():
    src = """
    import torch
    def main(model, loader, val_loader, opt):
        model.train()
        for epoch in range(10):
            for x, y in loader:
                opt.zero_grad()
                crit(model(x), y).backward()
                opt.step()
            model.eval()
            with torch.no_grad():
                acc = [model(x) for x in val_loader]
    """
    assert found(src) == {(line_of(src, "model.eval()"), "TVL005")}


PLAIN = """
import torch
{definition}
with torch.no_grad():
    err = ((model(x) - y) ** 2).mean()
print(err)
"""


def test_tvl004_plain_function_is_not_a_module():
    assert found(PLAIN.format(definition="def model(x):\n    return x @ w + b")) == set()
    assert found(PLAIN.format(definition="model = lambda x: x @ w + b")) == set()
    src = PLAIN.format(definition="model = Net()")
    assert found(src) == {(line_of(src, "err = "), "TVL004")}


def test_tvl008_message_says_what_to_do_for_pickled_modules_and_namespaces():
    [finding] = lint_source("import torch\nckpt = torch.load('x.pt')\n", "s.py")
    assert "model.state_dict()" in finding.message and "vars(args)" in finding.message
    assert "add_safe_globals" in finding.message


def test_tvl010_conditional_logging_and_module_moves_are_quiet():
    src = """
    for step, (x, y) in enumerate(loader):
        opt.zero_grad()
        loss = crit(model(x), y)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            print(loss.item())
        if step == last:
            model.cpu()
        running.append(loss.item())
    """
    assert found(src, {"TVL010"}) == {(line_of(src, "running.append"), "TVL010")}


RUN_EPOCH = """
import torch
def run_epoch(model, loader, opt, train=True):
    {mode}
    total = 0.0
    for x, y in loader:
        {grad_open}
            out = model(x)
            loss = crit(out, y)
        if train:
            opt.zero_grad()
            loss.backward()
            opt.step()
        total += loss.item()
    return total

for epoch in range(10):
    run_epoch(model, train_loader, opt, train=True)
    val_loss = run_epoch(model, val_loader, opt, train=False)
    print(val_loss)
"""


@pytest.mark.parametrize(
    "mode, grad_open, expected",
    [
        ("model.train(train)", "with torch.set_grad_enabled(train):", set()),
        ("model.train() if train else model.eval()", "with torch.set_grad_enabled(train):", set()),
        ("pass", "with torch.set_grad_enabled(train):", {"TVL004"}),
        ("model.train(train)", "if True:", {"TVL006"}),
        ("pass", "if True:", {"TVL004", "TVL006"}),
    ],
)
def test_run_epoch_with_train_false_is_an_evaluation_pass(mode, grad_open, expected):
    src = RUN_EPOCH.format(mode=mode, grad_open=grad_open)
    forward = line_of(src, "out = model(x)")
    assert found(src) == {(forward, code) for code in expected}


ESTIMATE = """
import torch
@torch.no_grad()
def estimate_loss():
    out = {{}}
    {eval_line}
    for split in ["train", "val"]:
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            X, Y = get_batch(split)
            logits, loss = model(X, Y)
            losses[k] = loss.item()
        out[split] = losses.mean()
    model.train()
    return out

model = GPT(config)
while True:
    if iter_num % eval_interval == 0:
        losses = estimate_loss()
        print(losses["val"])
    X, Y = get_batch("train")
    logits, loss = model(X, Y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
"""


def test_nanogpt_estimate_loss_without_eval_is_found():
    assert found(ESTIMATE.format(eval_line="model.eval()")) == set()
    src = ESTIMATE.format(eval_line="pass")
    assert found(src) == {(line_of(src, "logits, loss = model(X, Y)"), "TVL004")}


MODULE_LEVEL_VALIDATION = """
import torch
for epoch in range(epochs):
    model.train()
    for batch in train_dataloader:
        outputs = model(**batch)
        loss = outputs.loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    for batch in eval_dataloader:
        {grad_open}
            outputs = model(**batch)
        predictions = outputs.logits.argmax(dim=-1)
        metric.add_batch(predictions=predictions, references=batch["labels"])
    print(metric.compute())
"""


def test_module_level_validation_loop_without_no_grad():
    assert found(MODULE_LEVEL_VALIDATION.format(grad_open="with torch.no_grad():")) == set()
    src = MODULE_LEVEL_VALIDATION.format(grad_open="if True:")
    assert found(src) == {(line_of(src, "            outputs = model(**batch)"), "TVL006")}


SAMPLE = """
import torch
model = GPT(GPTConfig(**checkpoint["model_args"]))
model.load_state_dict(checkpoint["model"])
{eval_line}
x = torch.tensor(start_ids)[None, ...]
{grad_open}
    for k in range(num_samples):
        logits, _ = model(x)
        print(decode(logits.argmax(-1)[0].tolist()))
"""


def test_sample_script_with_autograd_on_and_train_mode():
    assert found(SAMPLE.format(eval_line="model.eval()", grad_open="with torch.no_grad():")) == set()
    src = SAMPLE.format(eval_line="", grad_open="if True:")
    forward = line_of(src, "logits, _ = model(x)")
    assert found(src) == {(forward, "TVL009"), (forward, "TVL006")}


PHASES = """
import torch
for epoch in range(num_epochs):
    for phase in ["train", "val"]:
        if phase == "train":
            model.train()
        else:
            {val_mode}
        for inputs, labels in dataloaders[phase]:
            optimizer.zero_grad()
            with torch.set_grad_enabled(phase == "train"):
                outputs = model(inputs)
                loss = criterion(outputs, labels)
                if phase == "train":
                    loss.backward()
                    optimizer.step()
            running_loss += loss.item() * inputs.size(0)
"""


def test_train_val_phases_are_walked_once_each():
    assert found(PHASES.format(val_mode="model.eval()")) == set()
    src = PHASES.format(val_mode="pass")
    assert found(src) == {(line_of(src, "outputs = model(inputs)"), "TVL004")}


def test_forward_kept_for_a_later_loss_is_not_an_evaluation_pass():
    # reinforcement learning: log-probabilities are stored on an object and reach backward() elsewhere
    src = """
    def select_action(state):
        probs = policy(state)
        m = Categorical(probs)
        action = m.sample()
        policy.saved_log_probs.append(m.log_prob(action))
        return action.item()

    def finish_episode():
        loss = torch.cat([-lp * r for lp, r in zip(policy.saved_log_probs, returns)]).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    """
    assert found(src) == set()


def test_module_forward_methods_are_not_evaluation_passes():
    src = """
    import torch
    class Net(torch.nn.Module):
        def forward(self, x):
            return self.decoder(self.encoder(x))

    def predict(model, x):
        return model(x)
    """
    assert found(src) == set()


def test_tvl007_loss_computed_under_no_grad_has_no_graph():
    src = """
    import torch
    for step in range(steps):
        loss = crit(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 100 == 0:
            val_loss = 0.0
            for _ in range(val_steps):
                {open_line}
                    _, loss = model(x_val, y_val)
                    val_loss += loss
    """
    assert found(src.format(open_line="with torch.no_grad():"), {"TVL007"}) == set()
    control = src.format(open_line="if True:")
    assert found(control, {"TVL007"}) == {(line_of(control, "val_loss += loss"), "TVL007")}


def test_submodule_forward_inside_a_module_method_is_the_callers_business():
    src = """
    import torch
    class Diffusion(torch.nn.Module):
        @torch.inference_mode()
        def sample(self, x):
            return self.denoise(x)

        def denoise(self, x):
            pred = self.model(x)
            return x - pred

    class Runner:
        @torch.inference_mode()
        def sample(self, x):
            out = self.model(x)
            return out.clamp(0, 1)
    """
    # control: the same forward in a plain class (not an nn.Module) is an evaluation pass without eval()
    assert found(src) == {(line_of(src, "out = self.model(x)"), "TVL004")}


MODE_FREE = """
import torch
import torch.nn as nn
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 100)
        self.act = nn.ReLU()
        {extra}
        self.fc2 = nn.Linear(100, 10)
    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))

model = Net()
with torch.no_grad():
    acc = (model(x).argmax(1) == y).float().mean()
print(acc)
"""


def test_tvl004_skips_models_without_mode_dependent_layers():
    assert found(MODE_FREE.format(extra="")) == set()
    assert (
        found("import torch\nmodel = torch.nn.Linear(4, 2)\nwith torch.no_grad():\n    print(model(x))\n")
        == set()
    )
    for layer in (
        "self.drop = nn.Dropout(0.5)",
        "self.bn = nn.BatchNorm1d(100)",
        "self.extra = timm.create_model('x')",
    ):
        src = MODE_FREE.format(
            extra=layer
        )  # control: a mode-dependent (or unknown) layer makes eval() matter
        assert found(src) == {(line_of(src, "acc = "), "TVL004")}, layer


SEQUENTIAL = """
import torch
import torch.nn as nn
model = nn.Sequential(nn.Linear(10, 32), {middle}, nn.ReLU(), nn.Linear(32, 2)).to("cpu")
with torch.no_grad():
    acc = (model(x).argmax(1) == y).float().mean()
print(acc)
"""


@pytest.mark.parametrize("middle, reported", [
    ("nn.Identity()", False),
    ("nn.Sequential(nn.Linear(32, 32), nn.Tanh())", False),
    ("nn.BatchNorm1d(32)", True),  # the README's own Trainer example is such a model
    ("nn.Dropout(0.5)", True),
    ("nn.Sequential(nn.Linear(32, 32), nn.Dropout(0.1))", True),
    ("Block()", True),  # unknown: not from this file
])
def test_tvl004_looks_inside_a_sequential_built_in_the_file(middle, reported):
    src = SEQUENTIAL.format(middle=middle)
    assert ((line_of(src, "acc = "), "TVL004") in found(src)) is reported, src


def test_from_pretrained_is_eval_only_for_hugging_face():
    hf = """
    import torch
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained("bert-base-uncased")
    with torch.no_grad():
        print(model(**batch).logits.argmax(-1))
    """
    assert found(hf) == set()
    own = hf.replace(
        "from transformers import AutoModelForSequenceClassification", "from model import GPT"
    ).replace("AutoModelForSequenceClassification.from_pretrained", "GPT.from_pretrained")
    assert found(own) == {(line_of(own, "print(model("), "TVL004")}


def test_tvl007_token_counts_are_not_losses():
    src = """
    for batch in loader:
        current_num_tokens = (batch["labels"] != self._loss_fn.ignore_index).sum()
        num_tokens += current_num_tokens
        current_loss = self._loss_step(batch) * current_num_tokens
        running_loss += {acc}
        current_loss.backward()
        opt.step()
        opt.zero_grad()
    """
    assert found(src.format(acc="current_loss.detach()"), {"TVL007"}) == set()
    control = src.format(acc="current_loss")  # the same loop keeping each batch's history
    assert found(control, {"TVL007"}) == {(line_of(control, "running_loss +="), "TVL007")}


def test_module_used_as_a_transform_inside_a_dataset_is_not_evaluation():
    src = """
    import torch
    class {base}:
        def __init__(self, rows):
            self.encoder = CharByteEncoder()
            self.samples = [self.encoder(r) for r in rows]
    """
    assert found(src.format(base="Names(torch.utils.data.Dataset)")) == set()
    control = src.format(base="Runner")
    assert found(control) == {
        (line_of(control, "self.samples ="), "TVL004"),
        (line_of(control, "self.samples ="), "TVL006"),
    }


def test_self_call_inside_a_module_method_is_the_callers_business():
    src = """
    import torch
    class GPT(torch.nn.Module):
        @torch.no_grad()
        def generate(self, idx):
            logits, _ = self(idx)
            return logits.argmax(-1)

        def parameters_count(self):
            return sum(p.numel() for p in self.parameters())

    class Sampler:
        @torch.no_grad()
        def generate(self, idx):
            logits, _ = self.model(idx)
            return logits.argmax(-1)
    """
    # control: the same code in a class that is not a module reports its forward
    assert found(src) == {(line_of(src, "logits, _ = self.model(idx)"), "TVL004")}


def test_single_letter_modules_are_modules_when_used_as_such():
    src = """
    import torch
    class Solver:
        def test(self, loader):
            self.G.load_state_dict(torch.load(path, weights_only=True))
            {eval_line}
            with torch.no_grad():
                for x, c in loader:
                    save(self.G(x, c))
    """
    assert found(src.format(eval_line="self.G.eval()")) == set()
    control = src.format(eval_line="pass")
    assert found(control) == {(line_of(control, "save(self.G(x, c))"), "TVL009")}
    # a capitalised call that nothing treats as a module builds one: Generator(...) is not a forward
    assert found("import torch\nwith torch.no_grad():\n    g = Generator(64)\nprint(g)\n") == set()


def test_rebinding_under_the_main_guard_still_kills():
    src = """
    if __name__ == "__main__":
        for step in range(steps):
            if step % 100 == 0:
                {eval_line}
                with torch.no_grad():
                    _, loss = model(x_val, y_val)
                    val_loss = loss.item()
            model.train()
            _, loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
    """
    assert found(src.format(eval_line="model.eval()")) == set()
    control = src.format(eval_line="pass")
    assert found(control) == {(line_of(control, "_, loss = model(x_val, y_val)"), "TVL004")}
