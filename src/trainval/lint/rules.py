"""The rules: classic training-loop mistakes, each with a code, a level and a fix hint.

Every rule is precision-first: it stays quiet unless the mistake is plain from the file alone,
following calls into helper functions defined in the same file.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass

from trainval.lint.analysis import EVAL_FUNC, LOOPS, Event, FileInfo, call_name, is_no_grad_ctx, method, text


@dataclass(frozen=True)
class Rule:
    code: str
    level: str           # error | warning | info
    default: bool        # enabled without --select
    summary: str
    hint: str
    wrong: str
    right: str


RULES = {r.code: r for r in [
    Rule("TVL001", "error", True, "zero_grad() between backward() and step() of the same optimizer",
         "zero the gradients before backward() or after step(), never between them",
         "loss.backward(); opt.zero_grad(); opt.step()", "loss.backward(); opt.step(); opt.zero_grad()"),
    Rule("TVL002", "error", True, "a loop calls backward() and step() but never zero_grad(): gradients pile up",
         "call opt.zero_grad() once per optimizer step (with accumulation: after each step)",
         "for x, y in loader: loss_fn(model(x), y).backward(); opt.step()",
         "for x, y in loader: loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()"),
    Rule("TVL003", "error", True, "step() before backward() in the loop body: each step applies the previous batch's gradients",
         "call backward() first, then step()",
         "for ...: opt.step(); loss = f(); loss.backward()", "for ...: loss = f(); loss.backward(); opt.step()"),
    Rule("TVL004", "error", True, "model used for evaluation without model.eval(): BatchNorm and Dropout stay in training mode",
         "call model.eval() before evaluating (and model.train() before training again)",
         "with torch.no_grad(): out = model(x_val)", "model.eval()\nwith torch.no_grad(): out = model(x_val)"),
    Rule("TVL005", "error", True, "training resumes after evaluation without model.train(): later epochs train in eval mode",
         "call model.train() at the start of each training epoch",
         "for epoch ...: train_one_epoch(); model.eval(); validate()",
         "for epoch ...: model.train(); train_one_epoch(); model.eval(); validate()"),
    Rule("TVL006", "warning", True, "evaluation forward passes with autograd on: memory and time spent on graphs never used",
         "wrap evaluation in torch.no_grad() / torch.inference_mode(), or decorate the function",
         "def evaluate(model, loader):\n    for x, y in loader: out = model(x)",
         "@torch.no_grad()\ndef evaluate(model, loader):\n    for x, y in loader: out = model(x)"),
    Rule("TVL007", "error", True, "a loss tensor is summed across iterations: every batch's autograd graph stays alive",
         "accumulate loss.item() or loss.detach() instead",
         "total += loss", "total += loss.item()"),
    Rule("TVL008", "warning", True, "torch.load without weights_only=True: safe only where torch >= 2.6 makes it the default",
         "pass weights_only=True (and map_location=...)",
         "torch.load(path)", "torch.load(path, map_location='cpu', weights_only=True)"),
    Rule("TVL009", "error", True, "state dict loaded, then inference without model.eval()",
         "call model.eval() after load_state_dict() and before predicting",
         "model.load_state_dict(sd); preds = model(x)", "model.load_state_dict(sd); model.eval(); preds = model(x)"),
    Rule("TVL010", "info", False, "host sync in the training loop every step (.item(), .cpu(), .numpy())",
         "keep running sums on the device and read them once per epoch",
         "running += loss.item()", "running += loss.detach()  # .item() once per epoch"),
    Rule("TVL011", "info", False, "epoch loss as the mean of batch means (sum / len(loader)): a short last batch weighs too much",
         "sum loss * batch_size and divide by the number of samples",
         "total += loss.item()  ...  total / len(loader)", "total += loss.item() * len(y)  ...  total / len(loader.dataset)"),
    Rule("TVL012", "error", True, "torch.load(..., weights_only=False) unpickles arbitrary code from the file",
         "use weights_only=True and save plain state_dicts; keep False only for files you made yourself",
         "torch.load(path, weights_only=False)", "torch.load(path, weights_only=True)"),
]}


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


def _at(node: ast.AST, code: str, message: str | None = None) -> tuple[int, int, str, str]:
    rule = RULES[code]
    return node.lineno, node.col_offset + 1, code, f"{message or rule.summary} (fix: {rule.hint})"


def check(info: FileInfo) -> Iterator[tuple[int, int, str, str]]:
    loops = [n for n in ast.walk(info.tree) if isinstance(n, LOOPS)]
    for loop in loops:
        yield from _optimizer_order(info, loop)
        yield from _epoch_modes(info, loop)
        yield from _loss_accumulation(info, loop)
        yield from _host_syncs(info, loop)
    yield from _eval_contexts(info)
    yield from _torch_load(info)
    yield from _load_then_infer(info)
    yield from _mean_of_batch_means(info)


# ------------------------------------------------------------------------------------------------
# TVL001-003: optimizer order inside a loop


def _own_events(info: FileInfo, loop: ast.AST) -> list[Event]:
    return list(info.events(loop.body))


def _innermost_loop(info: FileInfo, node: ast.AST) -> ast.AST | None:
    return info.enclosing(node, LOOPS + (ast.FunctionDef, ast.AsyncFunctionDef))


def _optimizer_order(info: FileInfo, loop: ast.AST) -> Iterator:
    events = _own_events(info, loop)
    steps = [e for e in events if e.kind == "step" and _innermost_loop(info, e.node) is loop]
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
                if z.kind == "zero" and last_b.order < z.order < step.order and (
                        z.receiver == step.receiver or (single_optimizer and info.is_model(z.receiver))):
                    yield _at(z.node, "TVL001", f"{z.receiver}.zero_grad() between backward() (line {last_b.node.lineno}) "
                                                 f"and {step.receiver}.step(): the gradients are discarded")
        # TVL003: an unconditional step before any backward in the body
        if backwards and not before and not step.in_if and step.node in _top_level_calls(loop):
            yield _at(step.node, "TVL003")
        # TVL002: backward and step but no zeroing anywhere in the loop or its helpers
        if backwards and not _zeroes(info, events, step.receiver):
            yield _at(step.node, "TVL002", f"{step.receiver}.step() in a loop with backward() but no zero_grad(): "
                                            "gradients pile up across iterations")


def _top_level_calls(loop: ast.AST) -> set[ast.AST]:
    out = set()
    for stmt in loop.body:
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
            out.add(stmt.value)
    return out


def _zeroes(info: FileInfo, events: list[Event], receiver: str) -> bool:
    for e in events:
        if e.kind == "zero" and (e.receiver == receiver or not e.receiver or not info.is_optimizer(e.receiver)
                                 or e.receiver not in info.optimizers):
            return True
        if e.kind == "call" and info.reaches(e.node, "zero"):
            return True
    return False


# ------------------------------------------------------------------------------------------------
# TVL005: an epoch loop that evaluates and trains but never switches back to train()


def _trains(info: FileInfo, events: list[Event]) -> bool:
    return any(e.kind == "backward" or (e.kind == "call" and info.reaches(e.node, "backward")) for e in events)


def _epoch_modes(info: FileInfo, loop: ast.AST) -> Iterator:
    events = _own_events(info, loop)
    if not _trains(info, events):
        return
    evals = []
    for e in events:
        if e.kind == "eval" and info.is_model(e.receiver):
            evals.append(e)
        elif e.kind == "call" and info.last_mode_in(e.node) == "eval":
            evals.append(e)
    if not evals:
        return
    restores = [e for e in events if e.kind == "train" or (e.kind == "call" and info.reaches(e.node, "train"))]
    if not restores:
        e = evals[0]
        yield _at(e.node, "TVL005")


# ------------------------------------------------------------------------------------------------
# TVL004 / TVL006: evaluation without eval() / without no_grad


def _eval_contexts(info: FileInfo) -> Iterator:
    for fn in [f for fs in info.functions.values() for f in fs]:
        if not EVAL_FUNC.search(fn.name) or fn.name.startswith("test_") and _is_pytest(info, fn):
            continue
        if info.in_lightning_module(fn) or fn.name.endswith("_step"):
            continue  # Lightning and similar frameworks switch modes and grad for these hooks
        events = list(info.events(fn.body))
        if any(e.kind == "backward" for e in events):
            continue
        calls = [e for e in events if e.kind == "model_call"]
        if not calls:
            continue
        first = calls[0]
        mode = _mode_before(info, events, first)
        if mode != "eval" and not _callers_set_eval(info, fn):
            yield _at(first.node, "TVL004", f"{first.receiver}(...) in {fn.name}() without {first.receiver.split('(')[0]}.eval() "
                                             "before it (here or at every call site)")
        if not any(is_no_grad_ctx(d) for d in fn.decorator_list) and not info.under_no_grad(first.node) \
                and not _callers_no_grad(info, fn):
            yield _at(first.node, "TVL006", f"{first.receiver}(...) in {fn.name}() runs with autograd on")
    # a `with torch.no_grad():` block in a loop-free or training scope that runs the model
    for node in ast.walk(info.tree):
        if isinstance(node, (ast.With, ast.AsyncWith)) and any(is_no_grad_ctx(i.context_expr) for i in node.items):
            scope = info.scope_of(node)
            if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef)) and (EVAL_FUNC.search(scope.name)
                                                                                or info.in_lightning_module(scope)):
                continue  # handled above
            block = list(info.events(node.body))
            calls = [e for e in block if e.kind == "model_call"]
            if not calls or not any(isinstance(n, LOOPS) for n in ast.walk(node)):
                continue
            scope_events = list(info.events(scope.body if hasattr(scope, "body") else []))
            if _mode_before(info, scope_events, calls[0]) == "eval":
                continue
            if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef)) and _callers_set_eval(info, scope):
                continue
            yield _at(calls[0].node, "TVL004", f"{calls[0].receiver}(...) under no_grad without "
                                                f"{calls[0].receiver.split('(')[0]}.eval() before it")


def _is_pytest(info: FileInfo, fn: ast.AST) -> bool:
    return "pytest" in info.source or "unittest" in info.source


def _mode_before(info: FileInfo, events: list[Event], target: Event) -> str | None:
    mode = None
    for e in events:
        if e.order >= target.order:
            break
        if e.kind in ("eval", "train"):
            mode = e.kind
        elif e.kind == "call":
            mode = info.last_mode_in(e.node) or mode
    return mode


def _call_sites(info: FileInfo, fn: ast.AST) -> list[ast.Call]:
    sites = []
    for node in ast.walk(info.tree):
        if isinstance(node, ast.Call) and fn in info.local_functions(node):
            sites.append(node)
    return sites


def _callers_set_eval(info: FileInfo, fn: ast.AST) -> bool:
    sites = _call_sites(info, fn)
    if not sites:
        return False
    for site in sites:
        scope = info.scope_of(site)
        events = list(info.events(scope.body))
        target = next((e for e in events if e.node is site), None)
        if target is None or _mode_before(info, events, target) != "eval":
            return False
    return True


def _callers_no_grad(info: FileInfo, fn: ast.AST) -> bool:
    sites = _call_sites(info, fn)
    return bool(sites) and all(info.under_no_grad(s) for s in sites)


# ------------------------------------------------------------------------------------------------
# TVL007: summing loss tensors across iterations


def _loss_names(info: FileInfo, loop: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(loop):
        if isinstance(node, ast.Call) and (m := method(node)) and m[1] == "backward":
            names.add(m[0])
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            made = call_name(node.value).lower()
            if "loss" in made or "criterion" in made:
                names |= {text(t) for t in node.targets}
    return names


def _detached(expr: ast.AST) -> bool:
    for n in ast.walk(expr):
        if isinstance(n, ast.Call):
            name = call_name(n)
            if name.endswith((".item", ".detach", ".cpu", ".tolist", ".numpy")) or name in ("float", "int"):
                return True
    return False


def _loss_accumulation(info: FileInfo, loop: ast.AST) -> Iterator:
    losses = _loss_names(info, loop)
    if not losses:
        return
    backwarded = {m[0] for n in ast.walk(info.tree) if isinstance(n, ast.Call) and (m := method(n)) and m[1] == "backward"}
    for node in ast.walk(loop):
        target = value = None
        if isinstance(node, ast.AugAssign) and isinstance(node.op, ast.Add):
            target, value = text(node.target), node.value
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.value, ast.BinOp) \
                and isinstance(node.value.op, ast.Add) and text(node.value.left) == text(node.targets[0]):
            target, value = text(node.targets[0]), node.value.right
        if target is None or target in losses or target in backwarded:
            continue
        if _assigned_before_in_body(info, loop, target, node):
            continue  # reset every iteration: a per-iteration sum, not an accumulation
        used = {text(n) for n in ast.walk(value) if isinstance(n, (ast.Name, ast.Attribute))}
        if used & losses and not _detached(value):
            yield _at(node, "TVL007", f"'{target}' accumulates the loss tensor across iterations; every batch's "
                                      "autograd graph stays alive")


def _assigned_before_in_body(info: FileInfo, loop: ast.AST, name: str, node: ast.AST) -> bool:
    for stmt in ast.walk(loop):
        if isinstance(stmt, ast.Assign) and stmt is not node and (stmt.lineno, stmt.col_offset) < (node.lineno, node.col_offset):
            if name in {text(t) for t in stmt.targets} and _innermost_loop(info, stmt) is _innermost_loop(info, node):
                return True
    return False


# ------------------------------------------------------------------------------------------------
# TVL008 / TVL009: loading


def _torch_load(info: FileInfo) -> Iterator:
    imported_load = any(isinstance(n, ast.ImportFrom) and n.module == "torch" and any(a.name == "load" for a in n.names)
                        for n in ast.walk(info.tree))
    for node in ast.walk(info.tree):
        if isinstance(node, ast.Call) and (call_name(node) == "torch.load" or (imported_load and call_name(node) == "load")):
            kw = {k.arg: k.value for k in node.keywords}
            value = kw.get("weights_only")
            if value is None:
                yield _at(node, "TVL008")
            elif isinstance(value, ast.Constant) and value.value is False:
                yield _at(node, "TVL012")


def _load_then_infer(info: FileInfo) -> Iterator:
    scopes = [info.tree] + [f for fs in info.functions.values() for f in fs]
    for scope in scopes:
        events = list(info.events(scope.body))
        for i, e in enumerate(events):
            if e.kind != "load_state" or not info.is_model(e.receiver):
                continue
            model = e.receiver
            for later in events[i + 1:]:
                if later.kind in ("eval", "train") and later.receiver == model:
                    break
                if later.kind == "backward" or (later.kind == "call" and info.reaches(later.node, "backward")):
                    break
                if later.kind == "call" and info.last_mode_in(later.node) is not None:
                    break
                if later.kind == "model_call" and later.receiver.split("(")[0] == model:
                    yield _at(later.node, "TVL009", f"{model}(...) after {model}.load_state_dict() (line {e.node.lineno}) "
                                                    f"without {model}.eval()")
                    break


# ------------------------------------------------------------------------------------------------
# TVL010 / TVL011: performance and metric hints (off by default)


def _host_syncs(info: FileInfo, loop: ast.AST) -> Iterator:
    events = _own_events(info, loop)
    if not any(e.kind == "backward" and _innermost_loop(info, e.node) is loop for e in events):
        return
    for node in ast.walk(loop):
        if isinstance(node, ast.Call) and (m := method(node)) and m[1] in ("item", "cpu", "numpy") \
                and _innermost_loop(info, node) is loop:
            yield _at(node, "TVL010", f".{m[1]}() on every training step is a host sync")


def _mean_of_batch_means(info: FileInfo) -> Iterator:
    for node in ast.walk(info.tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Call) \
                and call_name(node.right) == "len" and node.right.args:
            loader = text(node.right.args[0])
            if "loader" in loader.lower() and "loss" in text(node.left).lower() and ".dataset" not in loader:
                yield _at(node, "TVL011")


def rules_table() -> str:
    """The README's rules table, generated from :data:`RULES`."""
    lines = ["| code | level | default | what it finds | wrong | right |", "| --- | --- | --- | --- | --- | --- |"]
    for r in RULES.values():
        wrong = r.wrong.replace("\n", "<br>").replace("|", "\\|")
        right = r.right.replace("\n", "<br>").replace("|", "\\|")
        lines.append(f"| {r.code} | {r.level} | {'on' if r.default else 'off'} | {r.summary} | `{wrong}` | `{right}` |")
    return "\n".join(lines)
