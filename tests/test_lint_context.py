"""Issue 22: the eval-mode rule needs a mode-dependent layer, names are tracked through rebinding, calls are
resolved to their callers, decorators are read by what they wrap, returned outputs are followed. Each
pattern is a minimal file; each has a control (the same code with the mistake) reported at its line."""

from __future__ import annotations

import textwrap

from trainval.lint.cli import lint_source
from trainval.lint.rules import RULES

DEFAULT = {c for c, r in RULES.items() if r.default}


def lint(source: str, codes=None):
    return lint_source(textwrap.dedent(source), "case.py", codes or DEFAULT)


def found(source: str, codes=None) -> set[tuple[int, str]]:
    return {(f.line, f.code) for f in lint(source, codes)}


def line_of(source: str, needle: str) -> int:
    lines = textwrap.dedent(source).splitlines()
    return next(i for i, line in enumerate(lines, 1) if needle in line)


# -- TVL004 only where a mode-dependent layer is known or likely, and the message says which

LOSS_OBJECT = """
import torch
from splitcross import SplitCrossEntropyLoss
from model import RNNModel
model = RNNModel(ntokens, {dropout})
criterion = SplitCrossEntropyLoss(400, splits=[])
params = list(model.parameters()) + list(criterion.parameters())
def evaluate(data):
    {eval_line}
    total = 0
    with torch.no_grad():
        for x, y in data:
            out = model(x)
            total += criterion(out, y).item()
    return total
"""


def test_tvl004_not_on_a_loss_object_and_says_which_layer_is_likely():
    src = LOSS_OBJECT.format(dropout="dropout=0.5", eval_line="model.eval()")
    assert found(src) == set()
    control = LOSS_OBJECT.format(dropout="dropout=0.5", eval_line="pass")
    got = lint(control)
    assert {(f.line, f.code) for f in got} == {(line_of(control, "out = model(x)"), "TVL004")}
    assert "Dropout" in got[0].message and "dropout=" in got[0].message


SUBMODULE = """
import torch
import torch.nn as nn
def table(n):
    return torch.zeros(n, 8)
class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding.from_pretrained(table(10), freeze=True)
        self.proj = nn.Linear(8, 8){extra}
    def forward(self, x):
        return self.proj(self.emb(x))
class Transformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = Encoder()
        self.head = nn.Linear(8, 2)
    def forward(self, x):
        return self.head(self.encoder(x))
model = Transformer()
with torch.no_grad():
    enc = model.encoder(x)
    print(model(x).argmax(-1), enc)
"""


def test_tvl004_not_on_submodules_or_embeddings_of_a_mode_free_model():
    assert found(SUBMODULE.format(extra="")) == set()
    control = SUBMODULE.format(extra="\n        self.drop = nn.Dropout(0.1)")
    got = lint(control)
    assert {(f.line, f.code) for f in got} == {
        (line_of(control, "enc = model.encoder(x)"), "TVL004"),
        (line_of(control, "print(model(x)"), "TVL004"),
    }
    assert all("Dropout" in f.message for f in got)


PICKLED = """
import torch
import torch.nn as nn
torch.serialization.add_safe_globals([nn.Sequential, nn.Linear, nn.ReLU{extra}])
model = torch.load(path, weights_only=True)
with torch.no_grad():
    print(model(x))
"""


def test_tvl004_pickled_model_whose_safe_globals_are_mode_free():
    assert found(PICKLED.format(extra="")) == set()
    control = PICKLED.format(extra=", nn.BatchNorm1d")
    got = lint(control)
    assert {(f.line, f.code) for f in got} == {(line_of(control, "print(model(x))"), "TVL004")}
    assert "BatchNorm1d" in got[0].message


def test_tvl004_message_names_the_layers_of_a_class_of_the_file():
    src = """
    import torch
    import torch.nn as nn
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.bn = nn.BatchNorm1d(4)
    net = Net()
    with torch.no_grad():
        print(net(x))
    """
    (f,) = lint(src)
    assert f.code == "TVL004" and "BatchNorm1d" in f.message


# -- constructor calls are not forwards

def test_lowercase_module_class_call_builds_a_module():
    src = """
    import torch
    import torch.nn as nn
    class discriminator(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)
        def forward(self, x):
            return self.bn(x)
    netD = discriminator()
    {use}
    """
    assert found(src.format(use="print(netD)")) == set()
    control = src.format(use="with torch.no_grad():\n        print(netD(x))")
    assert found(control) == {(line_of(control, "print(netD(x))"), "TVL004")}


# -- caller context

HOOKS = """
import torch
import torch.nn as nn
class Classifier(Base):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1))
    def validation_step(self, batch):
        y_hat = self.net(batch[0])
        self.plot("acc", (y_hat.argmax(1) == batch[1]).float().mean())
class Trainer:
    def fit_epoch(self):
        self.model.train()
        for batch in self.train_dataloader:
            loss = self.model.training_step(batch)
            self.optim.zero_grad()
            loss.backward()
            self.optim.step()
        self.model.eval()
        for batch in self.val_dataloader:
            {grad}
                self.model.validation_step(batch)
"""


def test_hook_whose_only_caller_runs_it_under_eval_and_no_grad():
    assert found(HOOKS.format(grad="with torch.no_grad():")) == set()
    control = HOOKS.format(grad="if True:")
    assert found(control) == {(line_of(control, "y_hat = self.net(batch[0])"), "TVL006")}


WRAPPER = """
import torch
{decorator_def}
@{decorator}
def run(model, x):
    model.eval()
    preds = model(x)
    print(preds)
"""

SMART = """
def smart_inference_mode(torch_1_9=True):
    def decorate(fn):
        return (torch.inference_mode if torch_1_9 else torch.no_grad)()(fn)
    return decorate
"""


def test_decorators_that_wrap_no_grad_or_inference_mode():
    assert found(WRAPPER.format(decorator_def=SMART, decorator="smart_inference_mode()")) == set()
    assert found(WRAPPER.format(decorator_def="from utils import torch_no_grad", decorator="torch_no_grad")) == set()
    timer = SMART.replace("smart_inference_mode", "timed").replace(
        "(torch.inference_mode if torch_1_9 else torch.no_grad)()(fn)", "fn")
    control = WRAPPER.format(decorator_def=timer, decorator="timed()")
    assert found(control) == {(line_of(control, "preds = model(x)"), "TVL006")}


def test_branch_where_the_net_is_not_a_module_has_no_eval():
    src = """
    import torch
    import torch.nn as nn
    def evaluate_accuracy(net, data_iter):
        if {test}:
            with torch.no_grad():
                for X, y in data_iter:
                    print((net(X).argmax(1) == y).sum())
            return
        net.eval()
    """
    assert found(src.format(test="not isinstance(net, nn.Module)")) == set()
    control = src.format(test="isinstance(net, torch.nn.Module)")
    assert found(control) == {(line_of(control, "print((net(X)"), "TVL004")}


# -- a name's binding followed through rebinding

def test_imported_module_name_rebound_to_a_model():
    src = """
    import torch
    import model
    model = model.RNNModel(ntokens, dropout=0.5)
    def evaluate(data):
        model.eval()
        total = 0
        {grad}
            for x, y in data:
                out = model(x)
                total += crit(out, y).item()
        return total
    """
    assert found(src.format(grad="with torch.no_grad():")) == set()
    control = src.format(grad="if True:")
    assert found(control) == {(line_of(control, "out = model(x)"), "TVL006")}
    # an imported module that is never rebound is still not a model
    assert found("import torch\nimport model\nwith torch.no_grad():\n    print(model.helper(x))\n") == set()


def test_tvl008_through_an_alias_of_torch():
    src = "import torch as t\nsd = t.load(path{kw})\n"
    assert found(src.format(kw=", weights_only=True")) == set()
    assert found(src.format(kw="")) == {(2, "TVL008")}
    assert found("import torch as t\nimport pickle\nsd = pickle.load(f)\n") == set()


# -- optimizer order inside a function called once per iteration

TRAIN_FN = """
import torch
def train(x, y):
    {before}
    loss = crit(model(x), y)
    loss.backward()
    {between}
    opt.step()
    return loss.item()
for epoch in range(10):
    print(train(x, y))
"""


def test_tvl001_in_a_train_function_called_from_a_loop():
    assert found(TRAIN_FN.format(before="opt.zero_grad()", between="pass")) == set()
    control = TRAIN_FN.format(before="pass", between="opt.zero_grad()")
    assert found(control) == {(line_of(control, "    opt.zero_grad()"), "TVL001")}


EVAL_MID_EPOCH = """
import torch
def evaluate():
    model.eval()
    with torch.no_grad():
        val = crit(model(xv), yv).item()
    {restore}
    return val
def train():
    model.train()
    for i, (x, y) in enumerate(loader):
        loss = crit(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i % 100 == 0:
            print(evaluate())
for epoch in range(10):
    train()
"""


def test_tvl005_evaluate_without_train_called_mid_epoch():
    assert found(EVAL_MID_EPOCH.format(restore="model.train()")) == set()
    control = EVAL_MID_EPOCH.format(restore="pass")
    assert found(control) == {(line_of(control, "print(evaluate())"), "TVL005")}


# -- outputs that leave through a web handler or as plain numbers and text

WEB = """
import torch
from flask import Flask, jsonify
app = Flask(__name__)
model = build()
model.eval()
def get_prediction(x):
    {grad}
        outputs = model.forward(x)
    _, y_hat = outputs.max(1)
    return str(y_hat.item())
@app.route("/predict", methods=["POST"])
def predict():
    return jsonify({{"class": get_prediction(read())}})
"""


def test_inference_reached_from_a_web_handler():
    assert found(WEB.format(grad="with torch.no_grad():")) == set()
    control = WEB.format(grad="if True:")
    assert found(control) == {(line_of(control, "outputs = model.forward(x)"), "TVL006")}


def test_output_returned_as_a_number_or_text_is_an_evaluation():
    src = """
    import torch
    def accuracy(model, x, y):
        {eval_line}
        with torch.no_grad():
            return f"{{(model(x).argmax(1) == y).float().mean().item():.3f}}"
    """
    assert found(src.format(eval_line="model.eval()")) == set()
    control = src.format(eval_line="pass")
    assert found(control) == {(line_of(control, "return f"), "TVL004")}


def test_returned_tensor_of_a_model_passed_in_is_the_callers_business():
    # a sampling helper returns outputs to callers in other files, which set the mode (ddim's generalized_steps)
    src = "import torch\ndef sample(x, {param}):\n    with torch.no_grad():\n        return model(x)\n"
    assert found(src.format(param="model")) == set()
    control = src.format(param="steps")  # a global model: nothing outside sets its mode for this file
    assert found(control) == {(4, "TVL004")}


def test_optimizer_taken_by_a_helper_of_another_file_and_returned_losses():
    # p-christ's agents: the loss goes to self.take_optimisation_step(self.critic_optimizer, ...) (Base_Agent,
    # another file), or is returned to a learn() defined in another file
    src = """
    import torch
    class Agent(Base_Agent):
        def critic_learn(self, s, target):
            expected = self.critic_local(s)
            loss = ((expected - target) ** 2).mean()
            self.take_optimisation_step({opt}, self.critic_local, loss)
        def calculate_critic_losses(self, s):
            with torch.no_grad():
                nxt = self.critic_target(s)
            qf = self.critic_local(s)
            {ret}
    """
    quiet = src.format(opt="self.critic_optimizer", ret="qf1_loss = (qf - nxt).pow(2).mean()\n            return qf1_loss")
    assert found(quiet) == set()
    control = src.format(opt="self.critic_buffer", ret="qf1_loss = (qf - nxt).pow(2).mean()\n            return qf1_loss")
    assert found(control) == {(line_of(control, "expected = self.critic_local(s)"), "TVL004"),
                              (line_of(control, "expected = self.critic_local(s)"), "TVL006")}


# -- follow-up of round 6: values kept by helpers, shared helpers that train, evaluation hooks returning a loss

STORED_BY_HELPER = """
import torch
from torch.distributions import Categorical
class Agent:
    def __init__(self, policy):
        self.policy = Policy()
        self.optimizer = torch.optim.Adam(self.policy.parameters())
        self.log_probs = []
        self.entropies = []
    def act(self):
        probs = self.policy(self.state)
        dist = Categorical(probs)
        a = dist.sample()
        return a.item(), dist.log_prob(a)
    def play(self):
        action, log_prob = self.act()
        self.remember(log_prob)
    def remember(self, log_prob):
        self.{kept}.append(log_prob)
    def learn(self):
        loss = self.episode_loss()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
    def episode_loss(self):
        losses = []
        for lp in self.log_probs:
            losses.append(-lp)
        return torch.cat(losses).sum()
"""


def test_a_value_a_helper_keeps_on_self_for_a_later_loss_trains():
    # REINFORCE: act() returns log-probabilities, remember() appends them to self.log_probs, and
    # episode_loss() (whose result learn() gives to backward()) sums them: the forward in act() trains
    assert found(STORED_BY_HELPER.format(kept="log_probs")) == set()
    control = STORED_BY_HELPER.format(kept="entropies")  # kept where no loss reads it: an evaluation
    at = line_of(control, "probs = self.policy(self.state)")
    assert found(control) == {(at, "TVL004"), (at, "TVL006")}


SHARED_ACTING_HELPER = """
import torch
class Agent:
    def __init__(self):
        self.actor = Actor()
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters())
    def sample(self, state):
        mean = self.actor(state)
        return mean + torch.randn_like(mean)
    def act(self, state):
        {acting}
        return action.detach().cpu().numpy()
    def learn(self, state):
        loss = -self.sample(state).mean()
        self.actor_optimizer.zero_grad()
        loss.backward()
        self.actor_optimizer.step()
"""


def test_a_helper_that_trains_is_not_asked_for_eval_on_an_acting_path_with_autograd_on():
    # SAC's produce_action_and_action_info: the actor's training forward, reused to act while training
    src = SHARED_ACTING_HELPER.format(acting="action = self.sample(state)")
    at = line_of(src, "mean = self.actor(state)")
    assert found(src) == {(at, "TVL006")}  # the graph built to act is wasted (TVL006); the mode is training's
    # control: a path that turns autograd off to evaluate through the same helper still needs eval()
    control = SHARED_ACTING_HELPER.format(acting="with torch.no_grad():\n            action = self.sample(state)")
    assert found(control) == {(at, "TVL004")}


def test_an_evaluation_hook_returning_its_loss_is_an_evaluation():
    # skorch's validation_step override: its returned dict holds the validation loss, which nothing trains on
    src = """
    import torch
    class Net(NeuralNet):
        def {name}(self, X, y):
            self.module_.eval()
            output = self.module_(X)
            return {{'loss': self.get_loss(output, y), 'y_pred': output}}
    """
    at = line_of(src, "output = self.module_(X)")
    assert found(src.format(name="validation_step")) == {(at, "TVL006")}
    # control: a step returning its loss to a caller in another file trains
    assert found(src.format(name="train_step")) == set()


TARGET_NETWORK = """
import copy
import torch
critic = Critic()
critic_target = copy.deepcopy(critic)
opt = torch.optim.Adam({params})
for s, a, r, s2 in buffer:
    {target}
    loss = (critic(s) - target).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
"""


def test_a_target_network_no_optimizer_holds_run_with_autograd_on():
    # TD3/DQN: the target value comes from a deep copy that no optimizer holds, on replayed data; with
    # autograd on, its graph reaches no trained parameter
    src = TARGET_NETWORK.format(params="critic.parameters()", target="target = r + critic_target(s2)")
    assert found(src) == {(line_of(src, "target = r + critic_target(s2)"), "TVL006")}
    # controls: under no_grad; a network that no optimizer holds but whose input a trained model computed
    # (a perceptual loss: gradients must flow through it); an optimizer over parameters not named here
    quiet = [
        TARGET_NETWORK.format(params="critic.parameters()",
                              target="with torch.no_grad():\n        target = r + critic_target(s2)"),
        TARGET_NETWORK.format(params="critic.parameters()", target="target = critic_target(critic(s2))"),
        TARGET_NETWORK.format(params="params", target="target = r + critic_target(s2)"),
        TARGET_NETWORK.format(params="critic.parameters()",
                              target="target = r + critic_target(s2)\n    critic_target = critic.module"),
    ]
    for case in quiet:
        assert found(case) == set(), case
