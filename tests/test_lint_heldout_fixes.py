"""Issue 22, at depth: each cause of a held-out round's false alarms and misses, from a minimal file, with the
same code carrying the mistake (or the mode-dependent layer) as a control reported at its line."""

from __future__ import annotations

import textwrap

from conftest import line_of
from conftest import lint_found as found

from trainval.lint.cli import lint_source
from trainval.lint.rules import RULES

DEFAULT = {c for c, r in RULES.items() if r.default}


def lint(source: str):
    return lint_source(textwrap.dedent(source), "case.py", DEFAULT)


# -- TVL004 needs a mode-dependent layer, known or likely


LOSS_CLASS = """
import torch
from splitcross import SplitCrossEntropyLoss
model = RNNModel(ntokens, dropout=0.5)
crit = {built}
params = list(model.parameters()) + list(crit.parameters())
def evaluate(data):
    model.eval()
    total = 0
    with torch.no_grad():
        for x, y in data:
            out = model(x)
            total += crit(model.decoder.weight, out, y).item()
    return total
"""


def test_a_loss_class_with_parameters_is_mode_free_whatever_its_variable_is_called():
    # awd-lstm-lm: the loss object is told by its class (SplitCrossEntropyLoss), not by a variable named "loss"
    assert found(LOSS_CLASS.format(built="SplitCrossEntropyLoss(400, splits=[])")) == set()
    control = LOSS_CLASS.format(built="SplitScorer(400, splits=[])")  # not a loss class: its layers unseen
    got = lint(control)
    assert {(f.line, f.code) for f in got} == {(line_of(control, "total += crit("), "TVL004")}
    assert "SplitScorer" in got[0].message


INSTANCE_NORM = """
import torch
import torch.nn as nn
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3)
        self.norm = nn.InstanceNorm2d(3{stats})
    def forward(self, x):
        return self.norm(self.conv(x))
net = Net()
seq = nn.Sequential(nn.Conv2d(3, 3, 3), nn.InstanceNorm2d(3{stats}))
with torch.no_grad():
    print(net(x), seq(x))
"""


def test_instance_norm_matters_only_with_running_statistics():
    # InstanceNorm normalises each sample by its own statistics in both modes unless track_running_stats=True
    assert found(INSTANCE_NORM.format(stats="")) == set()
    assert found(INSTANCE_NORM.format(stats=", track_running_stats=False")) == set()
    control = INSTANCE_NORM.format(stats=", track_running_stats=True")
    got = lint(control)
    assert {(f.line, f.code) for f in got} == {(line_of(control, "print(net(x)"), "TVL004")}
    assert all("InstanceNorm2d" in f.message for f in got)


SAFE_GLOBALS = """
import torch
import torch.nn as nn
allowed = [nn.Sequential, nn.Linear, nn.ReLU{extra}]
torch.serialization.add_safe_globals(allowed)
model = torch.load(path, weights_only=True)
with torch.no_grad():
    print(model(x))
"""


def test_safe_globals_given_through_a_variable():
    assert found(SAFE_GLOBALS.format(extra="")) == set()
    control = SAFE_GLOBALS.format(extra=", nn.Dropout")
    got = lint(control)
    assert {(f.line, f.code) for f in got} == {(line_of(control, "print(model(x))"), "TVL004")}
    assert "Dropout" in got[0].message
    # a list added to where this does not follow may hold anything: still reported
    grown = SAFE_GLOBALS.format(extra="").replace(
        "torch.serialization", "allowed.append(Net)\ntorch.serialization"
    )
    assert found(grown) == {(line_of(grown, "print(model(x))"), "TVL004")}


# -- an imported name's binding, followed through rebinding and scopes


def test_an_imported_module_name_is_the_module_until_rebound_and_a_value_where_a_function_binds_it():
    # awd-lstm-lm: `import model` ... `model = model.RNNModel(...)`: the module before the rebinding
    before = """
    import torch
    import model
    with torch.no_grad():
        print(model.net(x))
    model = model.RNNModel(ntokens, dropout=0.5)
    with torch.no_grad():
        print(model(x))
    """
    assert found(before) == {(line_of(before, "print(model(x))"), "TVL004")}
    # a function that rebinds the name locally leaves the module-level name a module elsewhere
    local = """
    import torch
    import model
    def build():
        model = zoo.Net()
        return model
    def viz(x):
        with torch.no_grad():
            print(model.net(x))
    """
    assert found(local) == set()
    # a parameter named like the imported module is the caller's model, not the module
    param = """
    import torch
    import model
    def evaluate(model, data):
        with torch.no_grad():
            for x, y in data:
                print(model(x))
    """
    assert found(param) == {(line_of(param, "print(model(x))"), "TVL004")}


# -- round 7 (held out): what its labelled wrong findings showed

WGAN = """
import torch
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    def forward(self, x):
        return self.l(x)
class W(object):
    def __init__(self):
        self.D = Net()
        self.opt = torch.optim.RMSprop(self.D.parameters())
    def fit(self, loader):
        one = torch.FloatTensor([1])
        for it in range(10):
            self.opt.zero_grad()
            d = self.D(next(loader))
            d = d.mean(0).view(1)
            {backward}
            self.opt.step()
"""


def test_backward_with_a_gradient_argument_trains_its_receiver():
    # WGAN: d_loss_real.backward(one), g_loss.backward(mone)
    assert found(WGAN.format(backward="d.backward(one)")) == set()
    control = WGAN.format(
        backward="g.backward(one)"
    )  # d reaches no backward(): an evaluation in training mode
    at = line_of(control, "d = self.D(next(loader))")
    assert found(control) == {(at, "TVL004"), (at, "TVL006")}


FACTORY = """
import torch
class Agent:
    def __init__(self, config):
        self.network = config.network_fn()
        self.target_network = config.{built}
        self.optimizer = config.optimizer_fn(self.network.parameters())
"""


def test_a_factory_call_builds_a_network_it_does_not_run_one():
    # DeepRL: self.network = config.network_fn()
    assert found(FACTORY.format(built="network_fn()")) == set()
    control = FACTORY.format(built="network(state)")  # a forward of a network named like one
    at = line_of(control, "self.target_network = config.network(state)")
    assert found(control) == {(at, "TVL004"), (at, "TVL006")}


STORAGE = """
import torch
class Agent:
    def __init__(self):
        self.network = Net()
        self.optimizer = torch.optim.Adam(self.network.parameters())
    def step(self, states):
        storage = Storage()
        for t in range(5):
            q = self.network(states)
            storage.{kept}({{'q': q}})
        entries = storage.extract(['q'])
        loss = entries.q.pow(2).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
"""


def test_outputs_fed_to_a_rollout_storage_that_the_loss_reads_train():
    # DeepRL's n-step agents: storage.feed({'q': q}) ... storage.extract([...]) -> loss.backward()
    assert found(STORAGE.format(kept="feed")) == set()
    control = STORAGE.format(kept="feed").replace(
        "entries = storage.extract(['q'])", "entries = other.extract(['q'])"
    )
    at = line_of(control, "q = self.network(states)")
    assert found(control) == {(at, "TVL004"), (at, "TVL006")}


SYNC = """
import torch
import torch.nn as nn
net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1))
target = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1))
target.load_state_dict({weights})
with torch.no_grad():
    print(target(x))
"""


def test_a_target_synced_from_a_model_is_not_loaded_for_inference():
    # DQN: target_network.load_state_dict(network.state_dict()): TVL004's business, not TVL009's
    at = line_of(SYNC, "print(target(x))")
    assert found(SYNC.format(weights="net.state_dict()")) == {(at, "TVL004")}
    assert found(SYNC.format(weights="torch.load(path, weights_only=True)")) == {(at, "TVL009")}


# -- caller context: wrappers of no_grad/inference_mode recognised by what they wrap


WRAPPED = """
import torch
{wrapper}
def run(model, x):
    model.eval()
    {use}
        preds = model(x)
    print(preds)
"""


def test_a_wrapper_bound_to_a_variable_or_returned_by_a_helper_turns_autograd_off():
    variable = WRAPPED.format(wrapper="infer = torch.inference_mode()", use="with infer:")
    assert found(variable) == set()
    helper = WRAPPED.format(wrapper="def quiet():\n    return torch.no_grad()", use="with quiet():")
    assert found(helper) == set()
    # controls: a variable or helper bound to something else
    for control in (
        WRAPPED.format(wrapper="infer = torch.enable_grad()", use="with infer:"),
        WRAPPED.format(wrapper="def quiet():\n    return open('log.txt')", use="with quiet():"),
    ):
        assert found(control) == {(line_of(control, "preds = model(x)"), "TVL006")}, control


# -- caller context: a function passed to the caller that runs it


PASSED_STEP = """
import torch
def validation_step(batch):
    out = model(batch[0])
    return (out.argmax(1) == batch[1]).sum().item()
def run_epoch(loader, step):
    model.eval()
    {grad}
        for b in loader:
            print(step(b))
run_epoch(val_loader, validation_step)
"""


def test_a_step_function_passed_to_its_only_caller_runs_in_the_callers_state():
    assert found(PASSED_STEP.format(grad="with torch.no_grad():")) == set()
    control = PASSED_STEP.format(grad="if True:")  # the caller leaves autograd on
    assert found(control) == {(line_of(control, "out = model(batch[0])"), "TVL006")}
