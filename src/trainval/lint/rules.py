"""The rules: classic training-loop mistakes, each with a code, a level and a fix hint.

Every rule is precision-first: it stays quiet unless the mistake is plain from the file alone,
following calls into helper functions defined in the same file.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass

from trainval.lint.analysis import (
    LOOPS,
    Event,
    FileInfo,
    Function,
    Loop,
    call_name,
    method,
    model_key,
    text,
    walk,
)
from trainval.lint.flow import evaluation_forwards, frames, status, training_forward, training_keys


@dataclass(frozen=True)
class Rule:
    code: str
    level: str  # error | warning | info
    default: bool  # enabled without --select
    summary: str
    hint: str
    wrong: str
    right: str

    def explain(self) -> str:
        """What ``trainval lint --explain CODE`` prints: rationale, how it decides, an example and the fix."""
        wrong = "\n".join("    " + line for line in self.wrong.replace("; ", "\n").splitlines())
        right = "\n".join("    " + line for line in self.right.replace("; ", "\n").splitlines())
        return (
            f"{self.code} ({self.level}, {'on' if self.default else 'off'} by default): {self.summary}\n\n"
            f"Why: {RATIONALE[self.code]}\n\nWrong:\n{wrong}\n\nRight:\n{right}\n\nFix: {self.hint}\n"
            f"Silence one line with '# noqa: {self.code}'."
        )


RULES = {
    r.code: r
    for r in [
        Rule(
            "TVL001",
            "error",
            True,
            "zero_grad() between backward() and step() of the same optimizer",
            "zero the gradients before backward() or after step(), never between them",
            "loss.backward(); opt.zero_grad(); opt.step()",
            "loss.backward(); opt.step(); opt.zero_grad()",
        ),
        Rule(
            "TVL002",
            "error",
            True,
            "a loop calls backward() and step() but never zero_grad(): gradients pile up",
            "call opt.zero_grad() once per optimizer step (with accumulation: after each step)",
            "for x, y in loader: loss_fn(model(x), y).backward(); opt.step()",
            "for x, y in loader: loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()",
        ),
        Rule(
            "TVL003",
            "error",
            True,
            "step() before backward() in the loop body: each step applies the previous batch's gradients",
            "call backward() first, then step()",
            "for ...: opt.step(); loss = f(); loss.backward()",
            "for ...: loss = f(); loss.backward(); opt.step()",
        ),
        Rule(
            "TVL004",
            "error",
            True,
            "model used for evaluation without model.eval(): BatchNorm and Dropout stay in training mode",
            "call model.eval() before evaluating (and model.train() before training again)",
            "with torch.no_grad(): out = model(x_val)",
            "model.eval()\nwith torch.no_grad(): out = model(x_val)",
        ),
        Rule(
            "TVL005",
            "error",
            True,
            "training resumes after evaluation without model.train(): later epochs train in eval mode",
            "call model.train() at the start of each training epoch",
            "for epoch ...: train_one_epoch(); model.eval(); validate()",
            "for epoch ...: model.train(); train_one_epoch(); model.eval(); validate()",
        ),
        Rule(
            "TVL006",
            "warning",
            True,
            "evaluation forward passes with autograd on: memory and time spent on graphs never used",
            "wrap evaluation in torch.no_grad() / torch.inference_mode(), or decorate the function",
            "def evaluate(model, loader):\n    for x, y in loader: out = model(x)",
            "@torch.no_grad()\ndef evaluate(model, loader):\n    for x, y in loader: out = model(x)",
        ),
        Rule(
            "TVL007",
            "error",
            True,
            "a loss tensor is summed across iterations: every batch's autograd graph stays alive",
            "accumulate loss.item() or loss.detach() instead",
            "total += loss",
            "total += loss.item()",
        ),
        Rule(
            "TVL008",
            "warning",
            True,
            "torch.load without weights_only=True: safe only where torch >= 2.6 makes it the default",
            "pass weights_only=True (and map_location=...); for a pickled module or argparse Namespace save "
            "model.state_dict() / vars(args) instead, or torch.serialization.add_safe_globals([...]) the classes you trust",
            "torch.load(path)",
            "torch.load(path, map_location='cpu', weights_only=True)",
        ),
        Rule(
            "TVL009",
            "error",
            True,
            "state dict loaded, then inference without model.eval()",
            "call model.eval() after load_state_dict() and before predicting",
            "model.load_state_dict(sd); preds = model(x)",
            "model.load_state_dict(sd); model.eval(); preds = model(x)",
        ),
        Rule(
            "TVL010",
            "info",
            False,
            "host sync in the training loop every step (.item(), .cpu(), .numpy())",
            "keep running sums on the device and read them once per epoch",
            "running += loss.item()",
            "running += loss.detach()  # .item() once per epoch",
        ),
        Rule(
            "TVL011",
            "info",
            False,
            "epoch loss as the mean of batch means (sum / len(loader)): a short last batch weighs too much",
            "sum loss * batch_size and divide by the number of samples",
            "total += loss.item()  ...  total / len(loader)",
            "total += loss.item() * len(y)  ...  total / len(loader.dataset)",
        ),
        Rule(
            "TVL012",
            "error",
            True,
            "torch.load(..., weights_only=False) unpickles arbitrary code from the file",
            "use weights_only=True and save plain state_dicts; keep False only for files you made yourself",
            "torch.load(path, weights_only=False)",
            "torch.load(path, weights_only=True)",
        ),
    ]
}


RATIONALE = {
    "TVL001": "zero_grad() clears the gradients that backward() just computed, so the following step() applies "
    "nothing (or only what a later backward adds). Found when, in one loop body, the optimizer's "
    "zero_grad() (or the model's) comes after the last backward() and before that optimizer's step().",
    "TVL002": "backward() adds into .grad; without zeroing, every step applies the sum of all past gradients. "
    "Found when a loop calls backward() and step() and neither the loop nor the helpers it calls ever "
    "zero the gradients (zero_grad() or p.grad = None).",
    "TVL003": "An unconditional step() before the first backward() of the loop body applies the previous "
    "iteration's gradients to this iteration's weights: the update lags one batch behind.",
    "TVL004": "BatchNorm uses batch statistics and keeps updating its running averages, and Dropout drops units, "
    "unless the module is in eval mode: metrics and predictions are noisy and wrong. An evaluation pass is "
    "found by data flow: a forward whose result never reaches backward() (directly, through assignments, "
    "through helpers of the same file, or with train=False-style flags) but is used (metrics, "
    "predictions, printed, collected). The model's mode is followed along the paths that lead to it "
    "(model.eval()/train(flag) here, in helpers, or at the call sites).",
    "TVL005": "model.eval() in an epoch loop that trains the same model, with no model.train() anywhere in the loop "
    "or its helpers: from the second epoch on, training runs with eval-mode BatchNorm and no Dropout. "
    "Models that are never trained with autograd on (a frozen backbone in a linear probe) may stay in "
    "eval mode on purpose and are not reported.",
    "TVL006": "Without no_grad()/inference_mode() every evaluation forward records an autograd graph that nothing "
    "will use: memory grows with the batch and time is wasted. Same data-flow definition of an evaluation "
    "pass as TVL004; autograd is followed through with-blocks, decorators, set_grad_enabled(flag) with the "
    "flag's value at the call site, and local @contextmanager helpers. It also reports a target network "
    "run with autograd on (TD3/DQN's critic_target(next_state)): a model no optimizer of the file holds, "
    "on inputs no trained model computed, whose value a loss reads: the graph reaches nothing trained.",
    "TVL007": "Adding a loss tensor that still requires grad to a running total keeps every batch's autograd graph "
    "alive until the total is dropped: memory grows each iteration. Values read through .item(), "
    ".detach(), .data, float(), .tolist() or .numpy() are detached and fine.",
    "TVL008": "torch.load unpickles the file; before torch 2.6 the default weights_only=False lets a crafted file "
    "run code. Files holding whole pickled modules or argparse Namespaces do not load with "
    "weights_only=True: save model.state_dict() and vars(args) instead, or allow the classes you trust "
    "with torch.serialization.add_safe_globals([...]).",
    "TVL009": "load_state_dict() does not change the module's mode; a freshly built model is in training mode, so "
    "inference right after loading runs with batch-statistics BatchNorm and active Dropout. Not reported "
    "when the loaded model is then trained (its forward reaches backward()) or was put in eval mode "
    "before loading.",
    "TVL010": "Each .item()/.cpu()/.numpy() of a device tensor waits for the device to finish: once per step this "
    "stalls the pipeline. Reads inside a logging condition (if step % N == 0:) and moving a whole module "
    "with model.cpu() are not reported.",
    "TVL011": "sum(batch means) / len(loader) gives the short last batch the weight of a full one; multiply by "
    "the batch size and divide by the number of samples.",
    "TVL012": "weights_only=False unpickles arbitrary objects: a checkpoint from someone else can run code on "
    "your machine when you load it.",
}


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    col: int
    code: str
    message: str

    @property
    def level(self) -> str:
        return RULES[self.code].level


def _at(node: ast.stmt | ast.expr, code: str, message: str | None = None) -> tuple[int, int, str, str]:
    rule = RULES[code]
    return node.lineno, node.col_offset + 1, code, f"{message or rule.summary} (fix: {rule.hint})"


def check(info: FileInfo) -> Iterator[tuple[int, int, str, str]]:
    loops = [n for n in info.nodes if isinstance(n, LOOPS)]
    for loop in loops:
        yield from _optimizer_order(info, loop)
        yield from _callee_steps(info, loop)
        yield from _epoch_modes(info, loop)
        yield from _loss_accumulation(info, loop)
        yield from _host_syncs(info, loop)
    for fns in info.functions.values():
        for fn in (
            fns
        ):  # backward(); zero_grad(); step() in a function's own body: whoever calls it, once or per epoch
            yield from _optimizer_order(info, fn, only_order=True)
    yield from _evaluation_passes(info)
    yield from _frozen_model_passes(info)
    yield from _torch_load(info)
    yield from _mean_of_batch_means(info)


# ------------------------------------------------------------------------------------------------
# TVL001-003: optimizer order inside a loop


def _own_events(info: FileInfo, loop: Loop | Function) -> list[Event]:
    cache = info.__dict__.setdefault("_loop_events", {})
    if loop not in cache:
        cache[loop] = list(info.events(loop.body))
    return cache[loop]


def _innermost_loop(info: FileInfo, node: ast.AST) -> ast.AST | None:
    return info.enclosing(node, LOOPS + (ast.FunctionDef, ast.AsyncFunctionDef))


def _step_loop(info: FileInfo, step: Event) -> ast.AST | None:
    """The loop (or function) a step belongs to: its innermost one, except a loop over the optimizers it steps
    (``for optimizer in optimizers: optimizer.step()``), which steps each of them once per iteration of the loop
    around it."""
    scope = _innermost_loop(info, step.node)
    while (
        isinstance(scope, (ast.For, ast.AsyncFor))
        and isinstance(scope.target, ast.Name)
        and scope.target.id == step.receiver
    ):
        scope = _innermost_loop(info, scope)
    return scope


def _optimizer_order(info: FileInfo, loop: Loop | Function, only_order: bool = False) -> Iterator:
    events = _own_events(info, loop)
    steps = [e for e in events if e.kind == "step" and _step_loop(info, e) is loop]
    if not steps:
        return
    backwards = [e for e in events if e.kind == "backward"]
    single_optimizer = len({e.receiver for e in steps}) == 1 and len(info.optimizers) <= 1
    for step in steps:
        if step.has_args:  # step(closure): LBFGS-style, the closure does the work
            continue
        before = [b for b in backwards if b.order < step.order]
        # TVL001: zero_grad of this optimizer between the last backward before the step and the step
        if before:
            last_b = before[-1]
            for z in events:
                if (
                    z.kind == "zero"
                    and last_b.order < z.order < step.order
                    and (z.receiver == step.receiver or (single_optimizer and info.is_model(z.receiver)))
                ):
                    yield _at(
                        z.node,
                        "TVL001",
                        f"{z.receiver}.zero_grad() between backward() (line {last_b.node.lineno}) "
                        f"and {step.receiver}.step(): the gradients are discarded",
                    )
        if only_order:
            continue  # a function's body: its step() may come before a backward() of the caller's next iteration
        # TVL003: an unconditional step before any backward in the body
        if backwards and not before and not step.in_if and step.node in _top_level_calls(loop):
            yield _at(step.node, "TVL003")
        # TVL002: backward and step but no zeroing anywhere in the loop or its helpers
        if backwards and not _zeroes(info, events, step.receiver):
            yield _at(
                step.node,
                "TVL002",
                f"{step.receiver}.step() in a loop with backward() but no zero_grad(): "
                "gradients pile up across iterations",
            )


def _callee_steps(info: FileInfo, loop: Loop) -> Iterator:
    """TVL002 for a function of the file called once per iteration of a loop (``for it in ...:
    self.train_one_iter()``) whose own body, outside any loop of its own, runs backward() then step(): when
    neither that function (nor its helpers) zeroes the stepped optimizer nor does anything else the loop runs,
    gradients pile up across the loop's iterations as if the body were written in the loop."""
    events = _own_events(info, loop)
    for call in events:
        if not (call.kind == "call" and isinstance(call.node, ast.Call)):
            continue
        if _innermost_loop(info, call.node) is not loop:
            continue  # a nested loop is checked on its own
        for fn in info.local_functions(call.node):
            fn_events = info.fn_events(fn)
            steps = [
                e for e in fn_events if e.kind == "step" and not e.has_args and _step_loop(info, e) is fn
            ]
            if not steps or not _trains(info, fn_events):
                continue
            others = [e for e in events if e is not call]
            for step in steps:
                if _zeroes(info, fn_events, step.receiver) or _zeroes(info, others, step.receiver):
                    continue
                yield _at(
                    step.node,
                    "TVL002",
                    f"{step.receiver}.step() in {fn.name}(), called once per iteration of the loop at line "
                    f"{loop.lineno}, after backward() but with no zero_grad() in it or the loop: "
                    "gradients pile up across iterations",
                )


def _top_level_calls(loop: Loop | Function) -> set[ast.AST]:
    out: set[ast.AST] = set()
    for stmt in loop.body:
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
            out.add(stmt.value)
    return out


def _zeroes(info: FileInfo, events: list[Event], receiver: str) -> bool:
    for e in events:
        if e.kind == "zero" and (
            e.receiver == receiver
            or not e.receiver
            or not info.is_optimizer(e.receiver)
            or e.receiver not in info.optimizers
        ):
            return True
        if e.kind == "call" and isinstance(e.node, ast.Call) and info.reaches(e.node, "zero"):
            return True
    return False


# ------------------------------------------------------------------------------------------------
# TVL005: an epoch loop that evaluates and trains but never switches back to train()


def _trains(info: FileInfo, events: list[Event]) -> bool:
    return any(
        e.kind == "backward"
        or (e.kind == "call" and isinstance(e.node, ast.Call) and info.reaches(e.node, "backward"))
        for e in events
    )


def _epoch_modes(info: FileInfo, loop: Loop) -> Iterator:
    events = _own_events(info, loop)
    if not _trains(info, events):
        return
    trained = training_keys(info)  # a frozen backbone kept in eval mode on purpose is not one of them
    evals: list[tuple[Event, set[str]]] = []  # each with the trained model keys it puts in eval mode
    for e in events:
        if e.kind == "eval" and info.is_model(e.receiver) and model_key(e.receiver) in trained:
            evals.append((e, {model_key(e.receiver)}))
        elif e.kind == "call" and isinstance(e.node, ast.Call):
            keys = {
                key for key, mode in info.call_effects(e.node).items() if mode == "eval" and key in trained
            }
            if keys:
                evals.append((e, keys))
    if not evals:
        return
    restored = _restored_keys(info, events)
    if restored is None:
        return  # a restore that may be of any model
    for e, keys in evals:
        if (
            not keys <= restored
        ):  # pycls: train_epoch() puts the EMA copy back in training mode, not the model
            yield _at(e.node, "TVL005")
            return


def _restores(info: FileInfo, events: list[Event]) -> list[Event]:
    return [
        e
        for e in events
        if e.kind == "train"
        or (e.kind == "call" and isinstance(e.node, ast.Call) and info.reaches(e.node, "train"))
    ]


def _restored_keys(info: FileInfo, events: list[Event]) -> set[str] | None:
    """The model keys a loop's events put back in training mode (directly or through a helper, its parameters
    renamed to the arguments), or None when some restore cannot be tied to a model (``self.train()`` on the
    whole module, a helper's parameter given no nameable argument, a helper that trains then evaluates)."""
    keys: set[str] = set()
    for e in _restores(info, events):
        if e.kind == "train":
            key = model_key(e.receiver)
            if not key or key in ("self", "cls"):
                return None
            keys.add(key)
            continue
        assert isinstance(e.node, ast.Call)
        effects = info.call_effects(e.node)
        trains = {key for key, mode in effects.items() if mode == "train"}
        if not trains or trains & {"self", "cls", ""}:
            return None
        for fn in info.local_functions(e.node):
            rename, params = info.call_renames(e.node, fn)
            if any(p in info.mode_effects(fn) and p not in rename for p in params):
                return None  # a parameter's mode is set, but which argument it stands for is not known
        keys |= trains
    return keys


# ------------------------------------------------------------------------------------------------
# TVL004 / TVL006 / TVL009: evaluation passes (found by data flow, see flow.py)


def _evaluation_passes(info: FileInfo) -> Iterator:
    """One finding per forward and rule, whatever number of paths reach it."""
    seen = set()
    trained = training_keys(info)  # a model loaded to resume training is not "loaded for inference"
    for fw in evaluation_forwards(info):
        model = fw.model.split("(")[0]
        if (model == "self" or model.startswith("self.")) and _inside_module_class(info, fw.node):
            continue  # a submodule inside a module's own method: its mode and grad are the caller's to set
        if _inside_class(info, fw.node, "Dataset"):
            continue  # a module used as a transform while building samples is data preparation
        owner = model.rsplit(".", 1)[0] if "." in model and not model.startswith("self.") else model
        if fw.mode == "plain":
            continue  # the branch where it is not an nn.Module: a plain function has no mode and no parameters
        layers = (
            info.mode_layers(model, fw.frame.root_key(fw.key)) if fw.mode in (None, "train") else ("", "")
        )
        # a forward helper whose result a caller trains on, reached here with autograd still on, is the training
        # computation reused (SAC samples its actions with the actor's training forward): its mode is training
        # by design; where this path turned autograd off, it evaluates and the mode matters
        shared = fw.grad is not False and training_forward(info, fw.node)
        if (
            fw.mode in (None, "train")
            and ("mode", fw.node) not in seen
            and layers[0] != "free"
            and not shared
        ):
            seen.add(("mode", fw.node))
            why = (
                f"its {layers[1]} layers act differently in training mode"
                if layers[0] == "known"
                else layers[1]
            )
            if fw.loaded and fw.key not in trained:
                yield _at(
                    fw.node,
                    "TVL009",
                    f"{model}(...) after {owner}.load_state_dict() (line {fw.loaded}) "
                    f"without {owner}.eval(): {why}",
                )
            else:
                state = "in training mode" if fw.mode == "train" else f"without {owner}.eval() before it"
                yield _at(
                    fw.node,
                    "TVL004",
                    f"{model}(...) evaluates (its result never reaches backward()) {state}: {why}",
                )
        if fw.grad is True and ("grad", fw.node) not in seen:
            seen.add(("grad", fw.node))
            yield _at(
                fw.node,
                "TVL006",
                f"{model}(...) evaluates with autograd on (its result never reaches backward())",
            )


OPTIMIZER_CALL = re.compile(r"(^|\.)optim\.\w+$|Optimizer$|^(SGD|Adam|AdamW|RMSprop|Adagrad|LBFGS)$")
PARAMETER_METHODS = ("parameters", "named_parameters")


def _optimized_models(info: FileInfo) -> set[str] | None:
    """The models whose parameters the file's optimizers hold (``Adam(self.critic.parameters())``), or None when
    some optimizer takes parameters this cannot name (``Adam(params)``): then any model may be trained."""
    held: set[str] = set()
    for node in info.nodes:
        if not (isinstance(node, ast.Call) and OPTIMIZER_CALL.search(call_name(node))):
            continue
        given = node.args[:1] + [k.value for k in node.keywords if k.arg == "params"]
        if not given:
            return None
        for arg in given:
            covered, lambda_args = set(), set()
            for n in walk(arg):
                if (
                    isinstance(n, ast.Call)
                    and isinstance(n.func, ast.Attribute)
                    and (m := method(n))
                    and m[1] in PARAMETER_METHODS
                ):
                    held.add(m[0])
                    covered |= {id(x) for x in walk(n.func.value)}
                elif isinstance(n, ast.Call):
                    covered |= {id(x) for x in walk(n.func)}  # list(...), itertools.chain(...), filter(...)
                elif isinstance(n, ast.Lambda):
                    lambda_args |= {a.arg for a in n.args.args}
            for n in walk(arg):
                if isinstance(n, ast.Name) and id(n) not in covered and n.id not in lambda_args:
                    return None  # Adam(params) or a comprehension over a list built elsewhere
    return held


def _holds(held: set[str], key: str) -> bool:
    key = model_key(key)
    return any(h == key or key.startswith(h + ".") or h.startswith(key + ".") for h in map(model_key, held))


WRAPPERS = {
    "DDP",
    "DistributedDataParallel",
    "DataParallel",
    "FSDP",
    "FullyShardedDataParallel",
    "compile",
    "to",
    "cuda",
    "cpu",
    "half",
    "float",
    "double",
    "bfloat16",
    "train",
    "eval",
    "requires_grad_",
}


def _shares_with(info: FileInfo, model: str, held: set[str]) -> bool:
    """The model may share parameters with a held one through assignments (``raw_model = model.module``,
    ``model = DDP(model)``), a deep copy excepted (``critic_target = copy.deepcopy(critic)`` has its own)."""
    edges: dict[str, set[str]] = {}
    for node in info.nodes:
        if not isinstance(node, ast.Assign):
            continue
        value: ast.expr | None
        value, read = node.value, set()
        if isinstance(value, ast.Call) and call_name(value).split(".")[-1] in WRAPPERS:
            inner = [value.func.value] if isinstance(value.func, ast.Attribute) else []
            value = next((x for x in inner + value.args if isinstance(x, (ast.Name, ast.Attribute))), None)
        while isinstance(value, ast.Attribute):  # model.module, self.model: the object and its owners
            read.add(model_key(text(value)))
            value = value.value
        if isinstance(value, ast.Name):
            read.add(value.id)
        for t in node.targets:
            for key in {model_key(text(n)) for n in walk(t) if isinstance(n, (ast.Name, ast.Attribute))}:
                for r in read:
                    edges.setdefault(key, set()).add(r)
                    edges.setdefault(r, set()).add(key)
    seen, todo = set(), [model_key(model)]
    while todo:
        k = todo.pop()
        if k in seen:
            continue
        seen.add(k)
        if k != model_key(model) and _holds(held, k):
            return True
        todo += edges.get(k, ())
    return False


def _built_once(info: FileInfo, model: str) -> bool:
    """The model's name is bound only by assignments of a call (a constructor, ``copy.deepcopy``), never by a
    loop or an unpacking: the name stands for one model whose optimizer, if any, the file shows."""
    key, built = model_key(model), False
    for node in info.nodes:
        if isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)) and key in {
            model_key(text(n)) for n in walk(node.target)
        }:
            return False
        if isinstance(node, ast.Assign) and any(model_key(text(t)) == key for t in node.targets):
            built = built or isinstance(node.value, ast.Call)
        elif isinstance(node, ast.Assign) and any(
            key in {model_key(text(e)) for e in walk(t)} for t in node.targets
        ):
            return False
    return built


def _frozen_model_passes(info: FileInfo) -> Iterator:
    """TVL006 at a forward, with autograd on, of a model whose parameters no optimizer of the file holds, on
    inputs that no trained model computed, whose result reaches backward(): a target network's value
    (TD3's ``critic_target(next_state, actor_target(next_state))``). Its graph reaches no parameter that
    is trained, so autograd only spends memory and time on it."""
    held = _optimized_models(info)
    if not held:
        return
    lines = set()  # one finding per line: critic_target(s, actor_target(s)) is one mistake
    for frame in frames(info):
        if frame.truncated:
            continue
        for fw in frame.forwards:
            model = fw.model.split("(")[0]
            if fw.grad is not True or _holds(held, model) or _inside_module_class(info, fw.node):
                continue
            if (
                frame.root_key(fw.key) != fw.key
                or not _built_once(info, model)
                or _shares_with(info, model, held)
            ):
                continue  # a model passed in under another name, one of several bound to it, or a wrapper
            if _is_parameter_of_walk(frame, fw.key) or _detached_in_statement(info, fw.node):
                continue
            if (
                fw.node.lineno in lines
                or status(frame, fw.node, info, fw.pos) != "train"
                or not _inputs_untrained(info, frame, fw.node, held)
            ):
                continue
            lines.add(fw.node.lineno)
            yield _at(
                fw.node,
                "TVL006",
                f"{model}(...) runs with autograd on, but no optimizer here holds its "
                "parameters and its inputs come from no trained model: the graph built "
                "through it reaches nothing backward() trains",
            )


def _is_parameter_of_walk(frame, key: str) -> bool:
    """The model came in as a parameter of the outermost function walked: its caller may train it."""
    while frame.caller is not None and key in frame.aliases:
        key, frame = frame.aliases[key], frame.caller
    fn = frame.scope
    if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return False
    return key.split(".")[0] in {a.arg for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs} - {
        "self"
    }


def _detached_in_statement(info: FileInfo, node: ast.AST) -> bool:
    p = info.parents.get(node)
    while p is not None and not isinstance(p, ast.stmt):
        if isinstance(p, ast.Call) and (m := method(p)) and m[1] in ("detach", "detach_", "item"):
            return True
        p = info.parents.get(p)
    return False


def _inputs_untrained(info: FileInfo, frame, call: ast.Call, held: set[str]) -> bool:
    """Every value the forward reads comes from data or from models no optimizer holds, as far as the frame's
    assignments show (a call of the file's own functions or methods is not followed: not proven)."""
    reads: set[str] = set()
    for arg in list(call.args) + [k.value for k in call.keywords]:
        reads |= {text(n) for n in walk(arg) if isinstance(n, (ast.Name, ast.Attribute))}
    changed = True
    values = []
    while changed:
        changed = False
        for targets, value in frame.assigns:
            if targets & reads and value not in values:
                values.append(value)
                reads |= {text(n) for n in walk(value) if isinstance(n, (ast.Name, ast.Attribute))}
                changed = True
    for value in values + [call]:
        for n in walk(value):
            if not isinstance(n, ast.Call) or n is call:
                continue
            callee = call_name(n)
            if (
                callee.split(".")[0] == "self"
                and callee.count(".") == 1
                and callee.split(".")[1] in info.functions
            ):
                return False  # self.encode(x): a method of this file, not followed here
            if callee in info.functions or (info.is_model(callee) and _holds(held, callee)):
                return False
    return True


# ------------------------------------------------------------------------------------------------
# TVL007: summing loss tensors across iterations


def _loss_names(info: FileInfo, loop: ast.AST) -> set[str]:
    names = set()
    for node in walk(loop):
        if isinstance(node, ast.Call) and (m := method(node)) and m[1] == "backward":
            names.add(m[0])
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            # the function that makes the value: criterion(...), self._loss_step(...); not the receiver of a
            # method (`(labels != loss_fn.ignore_index).sum()` counts tokens, it is not a loss)
            func = node.value.func
            made = (func.attr if isinstance(func, ast.Attribute) else text(func)).lower()
            if "loss" in made or "criterion" in made:
                names |= {n for t in node.targets for n in _flat_targets(t)}
    return names


DETACHING = (".item", ".detach", ".tolist", ".numpy")


def _detached(expr: ast.AST) -> bool:
    """The value is read without autograd: ``.item()``, ``.detach()``, ``.data``, ``float()``, ``.tolist()``...

    ``.cpu()`` alone keeps the graph (``loss.cpu()`` requires grad); ``loss.detach().cpu()`` does not.
    """
    for n in walk(expr):
        if isinstance(n, ast.Attribute) and n.attr == "data":
            return True
        if isinstance(n, ast.Call):
            name = call_name(n)
            if name.endswith(DETACHING) or name in ("float", "int", "bool"):
                return True
    return False


def _loss_accumulation(info: FileInfo, loop: ast.AST) -> Iterator:
    losses = _loss_names(info, loop)
    if not losses:
        return
    backwarded = info.__dict__.get("_backwarded")
    if backwarded is None:
        backwarded = info._backwarded = {
            m[0] for n in info.nodes if isinstance(n, ast.Call) and (m := method(n)) and m[1] == "backward"
        }
    for node in walk(loop):
        target = value = None
        if isinstance(node, ast.AugAssign) and isinstance(node.op, ast.Add):
            target, value = text(node.target), node.value
        elif (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.value, ast.BinOp)
            and isinstance(node.value.op, ast.Add)
            and text(node.value.left) == text(node.targets[0])
        ):
            target, value = text(node.targets[0]), node.value.right
        if target is None or value is None or target in losses or target in backwarded:
            continue
        assert isinstance(node, ast.stmt)  # the AugAssign or Assign matched above
        if _assigned_before_in_body(info, loop, target, node):
            continue  # reset every iteration: a per-iteration sum, not an accumulation
        used = {text(n) for n in walk(value) if isinstance(n, (ast.Name, ast.Attribute))}
        if info.under_no_grad(node) or _computed_without_grad(info, loop, used & losses):
            continue  # a validation loss computed under no_grad has no graph to keep alive
        if used & losses and not _detached(value):
            yield _at(
                node,
                "TVL007",
                f"'{target}' accumulates the loss tensor across iterations; every batch's "
                "autograd graph stays alive",
            )


def _computed_without_grad(info: FileInfo, loop: ast.AST, names: set[str]) -> bool:
    """Every assignment of these names inside the loop happens under no_grad/inference_mode."""
    sites = [
        n
        for n in walk(loop)
        if isinstance(n, ast.Assign) and names & {t for target in n.targets for t in _flat_targets(target)}
    ]
    return bool(sites) and all(info.under_no_grad(n) for n in sites)


def _flat_targets(target: ast.AST) -> set[str]:
    if isinstance(target, (ast.Tuple, ast.List)):
        return set().union(*(_flat_targets(t) for t in target.elts)) if target.elts else set()
    return {text(target)}


def _assigned_before_in_body(info: FileInfo, loop: ast.AST, name: str, node: ast.stmt) -> bool:
    for stmt in walk(loop):
        if (
            isinstance(stmt, ast.Assign)
            and stmt is not node
            and (stmt.lineno, stmt.col_offset) < (node.lineno, node.col_offset)
        ):
            if name in {text(t) for t in stmt.targets} and _innermost_loop(info, stmt) is _innermost_loop(
                info, node
            ):
                return True
    return False


# ------------------------------------------------------------------------------------------------
# TVL008 / TVL009: loading


def _inside_module_class(info: FileInfo, node: ast.AST) -> bool:
    return _inside_class(info, node, "Module")


def _inside_class(info: FileInfo, node: ast.AST, base_word: str) -> bool:
    cls = info.enclosing(node, ast.ClassDef)
    return cls is not None and any(base_word in text(b) for b in cls.bases)


def _torch_load(info: FileInfo) -> Iterator:
    # the names torch.load goes by here: torch.load, t.load after `import torch as t`, load or tl after
    # `from torch import load [as tl]`
    names = {"torch.load"}
    for n in info.nodes:
        if isinstance(n, ast.Import):
            names |= {f"{a.asname}.load" for a in n.names if a.name == "torch" and a.asname}
        elif isinstance(n, ast.ImportFrom) and n.module == "torch":
            names |= {a.asname or a.name for a in n.names if a.name == "load"}
    for node in info.nodes:
        if (
            isinstance(node, ast.Call)
            and (
                isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                or isinstance(node.func, ast.Name)
            )
            and call_name(node) in names
        ):
            kw = {k.arg: k.value for k in node.keywords}
            value = kw.get("weights_only")
            if value is None:
                yield _at(node, "TVL008")
            elif isinstance(value, ast.Constant) and value.value is False:
                yield _at(node, "TVL012")


# ------------------------------------------------------------------------------------------------
# TVL010 / TVL011: performance and metric hints (off by default)


def _host_syncs(info: FileInfo, loop: Loop) -> Iterator:
    events = _own_events(info, loop)
    if not any(e.kind == "backward" and _innermost_loop(info, e.node) is loop for e in events):
        return
    for node in walk(loop):
        if (
            isinstance(node, ast.Call)
            and (m := method(node))
            and m[1] in ("item", "cpu", "numpy")
            and _innermost_loop(info, node) is loop
            and not _every_n_steps(info, node, loop)
        ):
            if m[1] == "cpu" and (info.is_model(m[0]) or isinstance(info.parents.get(node), ast.Expr)):
                continue  # model.cpu(): moves a module, not a per-step read of a tensor
            yield _at(node, "TVL010", f".{m[1]}() on every training step is a host sync")


def _every_n_steps(info: FileInfo, node: ast.AST, loop: ast.AST) -> bool:
    """Inside ``if step % N == 0:`` (or ``if i % log_interval``, ``if should_log``...): not every step."""
    p = info.parents.get(node)
    while p is not None and p is not loop:
        if isinstance(p, ast.If):
            test = p.test
            if any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.Mod) for n in walk(test)):
                return True
            if re.search(r"log|print|interval|every|freq|verbose|display|report", text(test), re.I):
                return True
        p = info.parents.get(p)
    return False


def _mean_of_batch_means(info: FileInfo) -> Iterator:
    for node in info.nodes:
        if (
            isinstance(node, ast.BinOp)
            and isinstance(node.op, ast.Div)
            and isinstance(node.right, ast.Call)
            and call_name(node.right) == "len"
            and node.right.args
        ):
            loader = text(node.right.args[0])
            if "loader" in loader.lower() and "loss" in text(node.left).lower() and ".dataset" not in loader:
                yield _at(node, "TVL011")


def rules_table() -> str:
    """The README's rules table, generated from :data:`RULES`."""
    lines = [
        "| code | level | default | what it finds | wrong | right |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in RULES.values():
        wrong = r.wrong.replace("\n", "<br>").replace("|", "\\|")
        right = r.right.replace("\n", "<br>").replace("|", "\\|")
        lines.append(
            f"| {r.code} | {r.level} | {'on' if r.default else 'off'} | {r.summary} | `{wrong}` | `{right}` |"
        )
    return "\n".join(lines)
