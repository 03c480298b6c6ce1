"""Evaluation passes, found by what a forward's result does rather than by function names.

The walker follows each scope's statements in order, the way the code runs: from the module body and
from every function that nothing in the file calls, into the local helpers a call reaches (with the
caller's constant arguments, so ``run_epoch(loader, train=False)`` is walked with ``train=False``).
Along the way it keeps, for each model, the mode the code has put it in (``eval``/``train``, unknown,
or ``mixed`` where paths disagree), whether autograd is off (``no_grad``, ``inference_mode``,
``set_grad_enabled(False)``), and whether a state dict was just loaded into it.

A forward ``model(x)`` is then judged by data flow inside its walk (a *frame*):

* it *trains* when its value reaches ``backward()`` (a ``.backward()`` receiver or argument,
  ``torch.autograd.grad``, a call that also takes the optimizer such as timm's ``loss_scaler(loss,
  optimizer)``, or a local helper that calls ``backward()``), through assignments;
* it is an *evaluation pass* when its value is used (metrics, predictions, printed, collected) and
  never reaches ``backward()``;
* a value that is returned is judged at the caller; at a function nothing calls, it counts as an
  evaluation pass only with evidence of inference (autograd off, the model in eval mode, or weights
  just loaded), so a module's own ``forward`` stays out of it.

Everything is bounded: a recursion guard on the call stack, a depth limit, and a budget of walked
statements per file, so recursive helpers and huge files cannot make it loop or explode.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import cast

from trainval.lint import analysis
from trainval.lint.analysis import (
    SCOPES,
    FileInfo,
    Function,
    call_name,
    method,
    model_key,
    text,
    wraps_no_grad,
)

MAX_DEPTH = 8
MAX_STATEMENTS = 60_000
UNKNOWN = object()
COLLECTORS = {
    "append",
    "extend",
    "add",
    "insert",
    "update",
    "put",
    "write",
    "add_scalar",
    "add_scalars",
    "log",
}


@dataclass
class State:
    modes: dict[str, str] = field(default_factory=dict)  # model key -> eval | train | mixed
    loaded: dict[str, int] = field(default_factory=dict)  # model key -> line of load_state_dict
    grad: bool | None = True  # False: autograd off; None: unknown

    def copy(self) -> State:
        return State(dict(self.modes), dict(self.loaded), self.grad)


def join(a: State, b: State) -> State:
    modes: dict[str, str] = {}
    for k in a.modes.keys() | b.modes.keys():
        ma, mb = a.modes.get(k), b.modes.get(k)
        if ma == mb and ma is not None:  # (never both None: k is a key of one of them)
            modes[k] = ma
        elif {ma, mb} <= {None, "train"}:
            continue  # not in eval mode on either path: unknown (reported like never set)
        else:
            modes[k] = "mixed"
    grad = a.grad if a.grad == b.grad else None
    return State(modes, {**a.loaded, **b.loaded}, grad)


@dataclass
class Forward:
    node: ast.Call
    model: str  # source text of the callee (``model``, ``self.net``)
    key: str  # model key for modes
    mode: str | None
    loaded: int | None
    grad: bool | None
    frame: Frame
    pos: int = 0  # where in the frame's seq the forward ran


@dataclass
class Frame:
    scope: ast.AST
    env: dict
    caller: Frame | None = None
    call: ast.Call | None = None
    aliases: dict[str, str] = field(default_factory=dict)  # parameter key -> caller's key
    assigns: list[tuple[set[str], ast.AST]] = field(default_factory=list)
    sinks: list[ast.AST] = field(default_factory=list)
    escapes: list[ast.AST] = field(default_factory=list)
    opaque: list[tuple[set[str], ast.AST]] = field(default_factory=list)  # stored on objects or in globals
    seq: list[tuple] = field(default_factory=list)  # assignments and sinks in the order walked
    call_pos: int = 0  # where in the caller's seq the call happened
    path: list = field(default_factory=list)  # the if-arms being walked: (id(if), arm) from the outside in
    forwards: list[Forward] = field(default_factory=list)
    has_step: bool = False
    yielded: State | None = None  # a context manager's state at its ``yield``
    truncated: bool = False  # the statement budget ran out inside this walk: its forwards are not judged
    _reach: list[bool] | None = None
    _unsure: list[bool] | None = None
    _escape: set[str] | None = None
    _opaque: set[str] | None = None

    def root_key(self, key: str) -> str:
        frame: Frame | None = self
        k = key
        while frame is not None and k in frame.aliases:
            k = frame.aliases[k]
            frame = frame.caller
        return k

    def assign(
        self, targets: set[str], value: ast.AST, stmt: ast.AST, kills: bool, held: bool = False
    ) -> None:
        """``held``: the targets may keep the value (``storage.feed(q)``, a method this cannot see into)."""
        self.assigns.append((targets, value))
        self.seq.append(("assign", targets, value, stmt, kills, tuple(self.path), held))

    def sink(self, exprs: Sequence[ast.AST]) -> None:
        self.sinks += exprs
        self.seq += [("sink", e, tuple(self.path)) for e in exprs]

    def reaching(self) -> list[bool]:
        """For each entry of ``seq``: does the value assigned there reach backward()?

        One backward liveness pass over the walked order: a value reaches when a later sink reads it, or a
        later assignment that reaches reads it, before a plain ``name = ...`` rebinds the name. So the
        ``outputs`` of an evaluation loop do not inherit the ``outputs.loss`` of the training loop above.
        A value given to a method that may keep it (``storage.feed({'q': q})``, later ``storage.extract()``
        into the loss) reaches only *possibly*: see :meth:`unsure`.
        """
        if self._reach is None:
            # name -> the if-arm paths of the later reads that reach backward(); a rebinding kills the reads
            # it always precedes (those inside its own arm), not those on a path that may skip it
            live: dict[str, set[tuple]] = {}
            maybe: dict[str, set[tuple]] = {}  # the same, for reads that possibly reach
            out = [False] * len(self.seq)
            unsure = [False] * len(self.seq)
            for i in range(len(self.seq) - 1, -1, -1):
                entry = self.seq[i]
                if entry[0] == "sink":
                    for name in _names(entry[1]):
                        live.setdefault(name, set()).add(entry[2])
                    continue
                _, targets, value, _, kills, path, held = entry
                reached = any(live.get(t) for t in targets)
                possibly = (held and reached) or (not reached and any(maybe.get(t) for t in targets))
                reached = reached and not held
                out[i], unsure[i] = reached, possibly
                if kills:
                    for table in (live, maybe):
                        for t in targets:
                            if t in table:
                                table[t] = {p for p in table[t] if p[: len(path)] != path}
                if reached or possibly:
                    for name in _names(value):
                        (live if reached else maybe).setdefault(name, set()).add(path)
            self._reach, self._unsure = out, unsure
        return self._reach

    def unsure(self) -> list[bool]:
        """For each entry of ``seq``: does the value possibly reach backward(), through a method that may keep it?"""
        self.reaching()
        assert self._unsure is not None
        return self._unsure

    def stored(self, used_for_training: set[str]) -> set[str]:
        """Names whose values are kept on an object or in a global that some backward() of the file reads
        (``policy.saved_log_probs`` summed into a later loss); a metric logger's attributes are not."""
        if self._opaque is None:
            self._opaque = _closure(
                [v for targets, v in self.opaque if targets & used_for_training], self.assigns
            )
        return self._opaque

    def escape(self) -> set[str]:
        if self._escape is None:
            # through assignments, except those that keep only a number or text (`total += loss.item()`)
            self._escape = _closure(self.escapes, [(t, v) for t, v in self.assigns if not _detaching(v)])
        return self._escape


def _names(node: ast.AST) -> set[str]:
    """Names and dotted attribute chains whose values an expression reads (every prefix of ``a.b.c``).

    A called function's own name is not a value read (``model(x)`` reads ``x`` and the model's weights,
    not the variable ``model``; following it would tie everything that configures the model to the loss);
    a method's receiver is (``loss.mean()`` reads ``loss``). Memoised per file: callers must not change it.
    """
    if _CACHE_FILE[0] is not analysis._CHILDREN:
        _reset_caches()
    hit = _NAMES.get(node)
    if hit is not None:
        return hit
    out = _NAMES[node] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        if isinstance(n, ast.Call):
            todo += n.args + [k.value for k in n.keywords]
            if isinstance(n.func, ast.Attribute):
                todo.append(n.func.value)
            elif not isinstance(n.func, ast.Name):
                todo.append(n.func)
            continue
        if isinstance(n, ast.Name):
            out.add(n.id)
        elif isinstance(n, ast.Attribute):
            chain = text(n)
            if chain and "(" not in chain and "[" not in chain:
                out.add(chain)
        kids = analysis._CHILDREN.get(n)
        todo.extend(kids if kids is not None else ast.iter_child_nodes(n))
    return out


# per-file memos of _names and _calls_in_order (the walks revisit the same statements once per call site)
_NAMES: dict[ast.AST, set[str]] = {}
_CALLS: dict[ast.AST, list[ast.Call]] = {}
_CACHE_FILE: list[object] = [None]  # the children table of the file the memos are for


def _reset_caches() -> None:
    _NAMES.clear()
    _CALLS.clear()
    _CACHE_FILE[0] = analysis._CHILDREN


def _closure(seeds: list[ast.AST], assigns: list[tuple[set[str], ast.AST]]) -> set[str]:
    reach: set[str] = set()
    for s in seeds:
        reach |= _names(s)
    changed = True
    while changed:
        changed = False
        for targets, value in assigns:
            if targets & reach:
                new = _names(value) - reach
                if new:
                    reach |= new
                    changed = True
    return reach


def _plain(target: ast.AST) -> bool:
    """``x = ...`` or ``a, b = ...``: the names are rebound (an item or attribute store is not)."""
    if isinstance(target, (ast.Tuple, ast.List)):
        return all(_plain(t) for t in target.elts)
    return isinstance(target, (ast.Name, ast.Starred))


def _target_names(target: ast.AST) -> set[str]:
    if isinstance(target, (ast.Tuple, ast.List)):
        return set().union(*(_target_names(t) for t in target.elts)) if target.elts else set()
    if isinstance(target, ast.Starred):
        return _target_names(target.value)
    while isinstance(target, ast.Subscript):
        target = target.value
    t = text(target)
    return {t} if t else set()


def _static(node: ast.AST, env: dict):
    """The constant value of a test under ``env`` (parameter -> constant), or UNKNOWN."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return env.get(node.id, UNKNOWN)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        v = _static(node.operand, env)
        return UNKNOWN if v is UNKNOWN else not v
    if isinstance(node, ast.BoolOp):
        values = [_static(v, env) for v in node.values]
        if isinstance(node.op, ast.And):
            if any(v is not UNKNOWN and not v for v in values):
                return False
            return True if all(v is not UNKNOWN for v in values) else UNKNOWN
        if any(v is not UNKNOWN and v for v in values):
            return True
        return False if all(v is not UNKNOWN for v in values) else UNKNOWN
    if isinstance(node, ast.Compare) and len(node.ops) == 1:
        left, right = _static(node.left, env), _static(node.comparators[0], env)
        if isinstance(node.comparators[0], (ast.Tuple, ast.List, ast.Set)):
            items = [_static(e, env) for e in node.comparators[0].elts]
            right = UNKNOWN if any(i is UNKNOWN for i in items) else items
        if left is UNKNOWN or right is UNKNOWN:
            return UNKNOWN
        op = node.ops[0]
        try:
            if isinstance(op, ast.Eq):
                return left == right
            if isinstance(op, ast.NotEq):
                return left != right
            if isinstance(op, ast.In):
                return left in right
            if isinstance(op, ast.NotIn):
                return left not in right
            if isinstance(op, ast.Is):
                return left is right
            if isinstance(op, ast.IsNot):
                return left is not right
        except TypeError:
            return UNKNOWN
    return UNKNOWN


class Walker:
    def __init__(self, info: FileInfo):
        self.info = info
        self.frames: list[Frame] = []
        self.budget = MAX_STATEMENTS
        self.stack: list[ast.AST] = []
        self.sites: dict[str, list[State]] = {}  # method name -> states at its `obj.method(...)` call sites

    # -- entry points

    def run(self) -> list[Frame]:
        info = self.info
        called = set()
        for node in info.nodes:
            if isinstance(node, ast.Call):
                for fn in info.local_functions(node):
                    if info.enclosing(node, (ast.FunctionDef, ast.AsyncFunctionDef)) is not fn:
                        called.add(fn)
                if info.local_functions(node):  # run_epoch(loader, validation_step): run by its caller
                    for arg in list(node.args) + [k.value for k in node.keywords]:
                        if isinstance(arg, ast.Name):
                            called.update(info.functions.get(arg.id, []))
        module = self.walk_scope(info.tree, {}, State(), None, None, {})
        everything = [fn for fns in info.functions.values() for fn in fns]
        # methods called on some object (`self.model.validation_step(batch)`): walked after every other scope,
        # in the state of their call sites (autograd, and the mode of the object they are called on)
        attr_called = {
            n.func.attr
            for n in info.nodes
            if isinstance(n, ast.Call)
            and isinstance(n.func, ast.Attribute)
            and text(n.func.value) not in ("self", "cls")
        }
        later = [
            fn
            for fn in everything
            if fn not in called
            and fn.name in attr_called
            and _is_method(fn)
            and fn.name not in COMMON_METHODS
        ]
        for fn in everything:
            if fn not in called and fn not in later:
                self.walk_scope(fn, _defaults(fn, {}), self._entry_state(fn, module), None, None, {})
        for fn in later:
            self.walk_scope(
                fn, _defaults(fn, {}), self._entry_state(fn, module, self.sites.get(fn.name)), None, None, {}
            )
        # functions the walks never reached (beyond the depth limit or the budget, or called only from
        # themselves): walked once on their own, with nothing known about their callers
        walked = {frame.scope for frame in self.frames}
        self.budget = max(self.budget, MAX_STATEMENTS // 3)
        for fn in everything:
            if fn not in walked:
                self.walk_scope(
                    fn, _defaults(fn, {}), State(grad=_decorated_grad(fn, True, info)), None, None, {}
                )
        return self.frames

    def _entry_state(self, fn: Function, module: State, sites: list[State] | None = None) -> State:
        """The state a function nothing in the file calls starts in: the models' modes the module body leaves
        (a web handler runs after `model.eval()` at module level), or the join of its call sites' states."""
        local = self.info.locals_of(fn)
        state = State(modes={k: v for k, v in module.modes.items() if k not in local})
        if _is_method(fn) and not _trains(fn):  # a model the object holds keeps the mode another method left
            for key in _modes_set_by_other_methods(fn, self.info):
                state.modes[key] = "mixed"
        if sites:
            joined = sites[0]
            for other in sites[1:]:
                joined = join(joined, other)
            state.grad = joined.grad
            if "self" in joined.modes:
                state.modes["self"] = joined.modes["self"]
        state.grad = _decorated_grad(fn, state.grad, self.info)
        return state

    def walk_scope(self, scope, env, state, caller, call, aliases) -> State:
        return self.walk_frame(scope, env, state, caller, call, aliases)[0]

    def walk_frame(self, scope, env, state, caller, call, aliases) -> tuple[State, Frame]:
        frame = Frame(scope, env, caller, call, aliases, call_pos=len(caller.seq) if caller else 0)
        self.frames.append(frame)
        self.stack.append(scope)
        try:
            return self.block(scope.body, state, frame), frame
        finally:
            self.stack.pop()

    # -- statements

    def block(self, body: list[ast.stmt], state: State, frame: Frame) -> State:
        for stmt in body:
            if self.budget <= 0:
                frame.truncated = True  # judged on a part of its code: its forwards are not judged
                return state
            self.budget -= 1
            state = self.stmt(stmt, state, frame)
        return state

    def stmt(self, stmt: ast.stmt, state: State, frame: Frame) -> State:
        if isinstance(stmt, SCOPES):
            return state
        env = frame.env
        if isinstance(stmt, (ast.If, ast.While)):
            state = self.expr(stmt.test, state, frame)
            value = _static(stmt.test, env)
            if isinstance(stmt, ast.If):
                if value is UNKNOWN:
                    arms = []
                    plain = _not_module_arm(stmt.test)
                    for arm, body in ((0, stmt.body), (1, stmt.orelse)):
                        frame.path.append((id(stmt), arm))
                        try:
                            entry = state.copy()
                            if plain is not None and plain[1] == arm:
                                entry.modes[plain[0]] = (
                                    "plain"  # `if not isinstance(net, nn.Module):` no eval() to call
                                )
                            arms.append(self.block(body, entry, frame))
                        finally:
                            frame.path.pop()
                    return join(*arms)
                return self.block(stmt.body if value else stmt.orelse, state, frame)
            if value is not UNKNOWN and not value:
                return self.block(stmt.orelse, state, frame)
            return join(state, self.block(stmt.body, state.copy(), frame))
        if isinstance(stmt, (ast.For, ast.AsyncFor)):
            state = self.expr(stmt.iter, state, frame)
            frame.assign(_target_names(stmt.target), stmt.iter, stmt, _plain(stmt.target))
            values = None
            if (
                isinstance(stmt.iter, (ast.List, ast.Tuple))
                and isinstance(stmt.target, ast.Name)
                and all(isinstance(e, ast.Constant) for e in stmt.iter.elts)
                and 0 < len(stmt.iter.elts) <= 4
            ):
                values = [
                    e.value for e in stmt.iter.elts if isinstance(e, ast.Constant)
                ]  # (every one is: checked above)
            if values is not None and isinstance(
                stmt.target, ast.Name
            ):  # for phase in ["train", "val"]: walk the body once per phase
                saved = env.get(stmt.target.id, UNKNOWN)
                for value in values:
                    env[stmt.target.id] = value
                    state = self.block(stmt.body, state, frame)
                if saved is UNKNOWN:
                    env.pop(stmt.target.id, None)
                else:
                    env[stmt.target.id] = saved
                return self.block(stmt.orelse, state, frame)
            state = join(state, self.block(stmt.body, state.copy(), frame))
            return self.block(stmt.orelse, state, frame)
        if isinstance(stmt, (ast.With, ast.AsyncWith)):
            inner = state
            for item in stmt.items:
                cm = item.context_expr
                fns = self.info.local_functions(cm) if isinstance(cm, ast.Call) else []
                fns = [f for f in fns if any("contextmanager" in text(d) for d in f.decorator_list)]
                if fns and isinstance(
                    cm, ast.Call
                ):  # a local @contextmanager: the block runs in the state at its yield
                    inner = self._enter(cm, fns, inner, frame, at_yield=True)
                    continue
                inner = self.expr(cm, inner, frame)
                if item.optional_vars is not None:
                    frame.assign(
                        _target_names(item.optional_vars), item.context_expr, stmt, _plain(item.optional_vars)
                    )
                g = grad_context(item.context_expr, env)
                if g is NOT_GRAD and wraps_no_grad(item.context_expr, self.info):
                    g = False  # with maybe_no_grad(): a helper of the file returning torch.no_grad()
                if g is not NOT_GRAD:
                    inner = inner.copy()
                    inner.grad = g
            after = self.block(stmt.body, inner.copy() if inner is state else inner, frame)
            if inner is not state and any(
                self.info.local_functions(i.context_expr)
                for i in stmt.items
                if isinstance(i.context_expr, ast.Call)
            ):
                after = after.copy()
                after.modes = dict(state.modes)  # the context manager restores the modes it changed
            after.grad = state.grad
            return after
        if isinstance(stmt, ast.Try) or type(stmt).__name__ == "TryStar":
            stmt = cast(ast.Try, stmt)  # or a TryStar (3.11), which has the same fields
            state = self.block(stmt.body, state, frame)
            for h in stmt.handlers:
                state = join(state, self.block(h.body, state.copy(), frame))
            state = self.block(stmt.orelse, state, frame)
            return self.block(stmt.finalbody, state, frame)
        if isinstance(stmt, ast.Match):
            state = self.expr(stmt.subject, state, frame)
            out = state
            for case in stmt.cases:
                out = join(out, self.block(case.body, state.copy(), frame))
            return out
        # simple statements
        if isinstance(stmt, (ast.Assign, ast.AugAssign, ast.AnnAssign)) and stmt.value is not None:
            state = self.expr(stmt.value, state, frame)
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            names = set().union(*(_target_names(t) for t in targets))
            if isinstance(stmt, ast.AugAssign):
                names |= _target_names(stmt.target)
            frame.assign(
                names, stmt.value, stmt, isinstance(stmt, ast.Assign) and all(_plain(t) for t in targets)
            )
            if any("." in n for n in names) or not _all_local(frame, names, self.info):
                frame.opaque.append((names, stmt.value))
            for t in targets:
                if isinstance(t, (ast.Name, ast.Attribute)) and self.info.is_model(text(t)):
                    state = self._assign_model(text(t), stmt.value, state)
            return state
        if isinstance(stmt, ast.Return) and stmt.value is not None:
            if not _detaching(
                stmt.value
            ):  # `return acc.item()`, `return f"..."`: no caller can backpropagate
                frame.escapes.append(stmt.value)
            return self.expr(stmt.value, state, frame)
        if isinstance(stmt, ast.Expr):
            v = stmt.value
            if isinstance(v, (ast.Yield, ast.YieldFrom)):
                frame.yielded = state.copy() if frame.yielded is None else join(frame.yielded, state)
                if v.value is not None:
                    frame.escapes.append(v.value)
            state = self.expr(v, state, frame)
            if (
                isinstance(v, ast.Call)
                and isinstance(v.func, ast.Attribute)
                and (m := method(v))
                and m[1] in COLLECTORS
                and (v.args or v.keywords)
            ):
                names = _target_names(v.func.value)  # outputs.append(model(x)): outputs now holds it
                frame.assign(names, v, stmt, False)
                if any("." in n for n in names) or not _all_local(frame, names, self.info):
                    frame.opaque.append((names, v))
            elif (written := _written_in_place(v, self.info)) is not None:
                frame.assign(written, v, stmt, False)  # m.view(-1).index_add_(0, idx, p): m now holds p
            elif (kept := _holder(v, self.info)) is not None:
                frame.assign(kept, v, stmt, False, held=True)  # storage.feed({'q': q}): storage may keep q
                if any("." in n for n in kept) or not _all_local(frame, kept, self.info):
                    frame.opaque.append((kept, v))
            return state
        for child in ast.iter_child_nodes(stmt):
            if isinstance(child, ast.expr):
                state = self.expr(child, state, frame)
        return state

    def _assign_model(self, target: str, value: ast.AST, state: State) -> State:
        """``model = ...``: the mode the new value is in, where the code shows it."""
        key = model_key(target)
        state = state.copy()
        inner = value
        while (
            isinstance(inner, ast.Call)
            and isinstance(inner.func, ast.Attribute)
            and inner.func.attr in ("to", "cuda", "cpu", "half", "float", "bfloat16", "requires_grad_")
        ):
            inner = inner.func.value
        source = None
        if isinstance(inner, (ast.Name, ast.Attribute)):
            source = model_key(text(inner))  # model = model.to(device)
        elif (
            isinstance(inner, ast.Call)
            and inner.args
            and isinstance(inner.args[0], (ast.Name, ast.Attribute))
            and self.info.is_model(text(inner.args[0]))
            and not self.info.evaluates_in_init(inner)
        ):
            source = model_key(
                text(inner.args[0])
            )  # DDP(model), torch.compile(model): the same module's mode
        if source is not None and source != key:
            tables: tuple[dict, dict] = (state.modes, state.loaded)  # a value is copied as it is
            for table in tables:
                if source in table:
                    table[key] = table[source]
                else:
                    table.pop(key, None)
            return state
        if source == key:
            return state
        state.loaded.pop(key, None)
        if isinstance(inner, ast.Call) and (m := method(inner)) and m[1] in ("eval", "train"):
            off = m[1] == "eval" or (inner.args and _static(inner.args[0], {}) is False)
            state.modes[key] = "eval" if off else "train"
        elif isinstance(inner, ast.Call) and self.info.evaluates_in_init(inner):
            state.modes[key] = (
                "eval"  # NetworkEMA(net): a wrapper whose __init__ puts what it wraps in eval mode
            )
        elif "from_pretrained" in text(value) and self.info.from_hugging_face(value):
            state.modes[key] = "eval"  # Hugging Face's from_pretrained returns models in eval mode
        else:
            state.modes.pop(key, None)
        return state

    # -- expressions: calls in evaluation order

    def expr(self, node: ast.AST, state: State, frame: Frame) -> State:
        info = self.info
        for call in _calls_in_order(node):
            m = method(call)
            name = call_name(call)
            if (
                m
                and m[1] in ("eval", "train")
                and not call.keywords
                or m
                and m[1] == "train"
                and call.keywords
            ):
                recv = m[0]
                if not recv or not (info.is_model(recv) or recv in info.models or _own_mode(call, info)):
                    continue
                key = model_key(recv)
                arg = call.args[0] if call.args else (call.keywords[0].value if call.keywords else None)
                value = True if arg is None else _static(arg, frame.env)
                state = state.copy()
                state.loaded.pop(key, None)
                if m[1] == "eval":
                    state.modes[key] = "eval"
                else:
                    state.modes[key] = "mixed" if value is UNKNOWN else ("train" if value else "eval")
                continue
            if m and m[1] == "load_state_dict" and info.is_model(m[0]):
                if not _copies_a_model(call, info):  # target.load_state_dict(online.state_dict()): a sync
                    state = state.copy()
                    state.loaded[model_key(m[0])] = call.lineno
                continue
            args = list(call.args) + [k.value for k in call.keywords]
            if m and m[1] in ("backward", "manual_backward") and isinstance(call.func, ast.Attribute):
                # loss.backward() and loss.backward(gradient) (WGAN's `backward(one)`): the receiver, and the
                # gradient it is given; accelerator.backward(loss), self.manual_backward(loss),
                # torch.autograd.backward(loss): the argument
                wrapper = (
                    m[1] == "manual_backward"
                    or m[0] in ("self", "cls")
                    or m[0].split(".")[0] in info.imported
                    and m[0].split(".")[0] not in info.rebound
                )
                frame.sink(list(call.args) if wrapper and call.args else [call.func.value, *call.args])
                continue
            if name.endswith(("autograd.grad", "autograd.backward")) or name in ("grad", "backward"):
                frame.sink(args)
                continue
            if m and m[1] == "step" and (info.is_optimizer(m[0]) or "scaler" in m[0].lower()):
                frame.has_step = True
                continue
            optimizers = [  # text(a) in info.optimizers, or named like one (made in another file)
                a
                for a in args
                if isinstance(a, (ast.Name, ast.Attribute))
                and (
                    text(a) in info.optimizers
                    or (re.search(r"optim", text(a), re.I) and info.is_optimizer(text(a)))
                )
            ]
            if (
                optimizers
            ):  # loss_scaler(loss, optimizer), amp.scale_loss(loss, optimizer): the other arguments
                frame.sink([a for a in args if a not in optimizers])
            local = info.local_functions(call) or self._passed_function(call, frame)
            if local:
                if info.reaches(call, "backward"):
                    frame.sink(args)
                state = self._enter(call, local, state, frame)
                continue
            if m and m[1] in info.functions and m[0] not in ("self", "cls"):
                site = State(grad=state.grad)
                mode = state.modes.get(model_key(m[0]))
                if mode is not None:
                    site.modes["self"] = mode
                self.sites.setdefault(m[1], []).append(site)
            if self._is_forward(call, name, m) and not info.builds_module(call):
                recv = name if not (m and m[1] == "forward") else m[0]
                key = model_key(recv)
                mode = state.modes.get(key)
                if mode is None and recv.split(".")[0] == "self":
                    mode = state.modes.get("self")  # a method run on a model its caller put in eval mode
                frame.forwards.append(
                    Forward(
                        call,
                        recv,
                        key,
                        mode,
                        state.loaded.get(key),
                        state.grad,
                        frame,
                        len(frame.seq),
                    )
                )
        return state

    def _passed_function(self, call: ast.Call, frame: Frame) -> list[Function]:
        """``step(batch)`` where the caller passed a function of the file as ``step``
        (``run_epoch(loader, validation_step)``): that function, run in this frame's state."""
        func = call.func
        if not isinstance(func, ast.Name) or func.id not in frame.aliases:
            return []
        return self.info.functions.get(frame.aliases[func.id], [])

    def _is_forward(self, call: ast.Call, name: str, m) -> bool:
        info = self.info
        if m and m[1] == "forward":
            return "(" not in m[0] and info.is_module(m[0], call)
        # model(x), self.model(x), model.encoder(x); not model(x).sum(), which is a tensor method
        return bool(name) and "(" not in name and info.is_module(name, call)

    def _enter(self, call: ast.Call, fns: list, state: State, frame: Frame, at_yield: bool = False) -> State:
        if len(self.stack) > MAX_DEPTH or self.budget <= 0:
            return state
        out = None
        for fn in fns:
            if fn in self.stack:  # recursion in the analysed code: do not follow
                continue
            env, aliases = _bind(fn, call, frame.env)
            inner = state.copy()
            for param, arg_key in aliases.items():
                if arg_key in state.modes:
                    inner.modes[param] = state.modes[arg_key]
                if arg_key in state.loaded:
                    inner.loaded[param] = state.loaded[arg_key]
            inner.grad = _decorated_grad(fn, inner.grad, self.info)
            after, callee = self.walk_frame(fn, env, inner, frame, call, aliases)
            used = _closure(callee.sinks, callee.assigns)
            pairs = _pairs(fn, call)
            passed = [arg for param, arg in pairs if param in used]
            if passed:  # update(loss) whose body gives loss to backward() (or to a call taking the optimizer)
                frame.sink(passed)
            for (
                targets,
                value,
            ) in callee.opaque:  # store(log_prob) whose body keeps it on self: so does the call
                kept = _names(value)
                frame.opaque += [(targets, arg) for param, arg in pairs if param in kept]
            if at_yield:
                after = callee.yielded or after
            result = state.copy()
            result.grad = after.grad if at_yield else state.grad
            for k, v in after.modes.items():
                if k not in aliases:
                    result.modes[k] = v
            for param, arg_key in aliases.items():
                if param in after.modes:
                    result.modes[arg_key] = after.modes[param]
                if param in after.loaded:
                    result.loaded[arg_key] = after.loaded[param]
                else:
                    result.loaded.pop(arg_key, None)
            out = result if out is None else join(out, result)
        return out or state


NOT_GRAD = object()
GRAD_OFF = {
    "torch.no_grad",
    "no_grad",
    "torch.inference_mode",
    "inference_mode",
    "torch.autograd.no_grad",
    "torch.autograd.grad_mode.no_grad",
}
GRAD_SET = {"torch.set_grad_enabled", "set_grad_enabled", "torch.autograd.set_grad_enabled"}
GRAD_ON = {"torch.enable_grad", "enable_grad"}


def grad_context(expr: ast.AST, env: dict):
    """False under no_grad/inference_mode/set_grad_enabled(False), True where grad is enabled, None where it
    depends on a value not known here, NOT_GRAD for any other context manager or decorator."""
    target = expr.func if isinstance(expr, ast.Call) else expr
    name = text(target)
    args = expr.args if isinstance(expr, ast.Call) else []
    if name in GRAD_OFF:
        if name.endswith("inference_mode") and args:
            value = _static(args[0], env)
            return None if value is UNKNOWN else (False if value else True)
        return False
    if name in GRAD_SET:
        if not args:
            return NOT_GRAD
        value = _static(args[0], env)
        return None if value is UNKNOWN else bool(value)
    if name in GRAD_ON:
        return True
    return NOT_GRAD


def _decorated_grad(fn: ast.AST, grad: bool | None, info: FileInfo | None = None) -> bool | None:
    for d in getattr(fn, "decorator_list", []):
        g = grad_context(d, {})
        if g is not NOT_GRAD:
            return g
        if info is not None and wraps_no_grad(d, info):
            return False  # @smart_inference_mode(): a wrapper of inference_mode/no_grad
    return grad


def _calls_in_order(node: ast.AST) -> list[ast.Call]:
    """Memoised per file: callers must not change the list."""
    if _CACHE_FILE[0] is not analysis._CHILDREN:
        _reset_caches()
    hit = _CALLS.get(node)
    if hit is not None:
        return hit
    calls = []
    todo = [node]
    table = analysis._CHILDREN
    while todo:
        n = todo.pop()
        if isinstance(n, (ast.Lambda, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if isinstance(n, ast.Call):
            calls.append(n)
        kids = table.get(n)
        todo.extend(kids if kids is not None else ast.iter_child_nodes(n))
    # inner calls (receivers, arguments) run before the call that contains them
    calls.sort(key=lambda c: (c.end_lineno or c.lineno, c.end_col_offset or c.col_offset))
    _CALLS[node] = calls
    return calls


def _defaults(fn: Function, env: dict) -> dict:
    env = dict(env)
    args = fn.args
    positional = args.posonlyargs + args.args
    for a, d in zip(positional[len(positional) - len(args.defaults) :], args.defaults):
        if isinstance(d, ast.Constant):
            env[a.arg] = d.value
    for a, default in zip(args.kwonlyargs, args.kw_defaults):
        if isinstance(default, ast.Constant):
            env[a.arg] = default.value
    return env


COMMON_METHODS = {
    "train",
    "eval",
    "step",
    "forward",
    "zero_grad",
    "backward",
    "parameters",
    "to",
    "cuda",
    "cpu",
    "update",
    "append",
    "get",
    "item",
    "save",
    "load",
    "load_state_dict",
    "state_dict",
    "reset",
    "add",
    "run",
    "close",
    "write",
    "log",
    "__call__",
    "__init__",
    "__enter__",
    "__exit__",
}
ROUTES = {"route", "get", "post", "put", "delete", "patch", "websocket", "api_route"}


def _own_mode(call: ast.Call, info: FileInfo) -> bool:
    """``self.eval()`` / ``self.train()`` inside a class of the file that has no method of that name: the
    module's own mode, and so its sub-modules' (an ensemble's ``self.estimators_``)."""
    m = method(call)
    if m is None or m[0] != "self":
        return False
    cls = info.enclosing(call, ast.ClassDef)
    return cls is not None and not any(
        isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == m[1] for n in cls.body
    )


def _trains(fn: Function) -> bool:
    """``fn`` calls ``backward()`` or an optimizer's ``step()``: a training method, whose models are in training
    mode when it starts (sampling inside it runs in that mode, whatever another method does)."""
    return any(
        isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in ("backward", "step")
        for n in ast.walk(fn)
    )


def _modes_set_by_other_methods(fn: Function, info: FileInfo) -> set[str]:
    """The model keys (``self.G``, or ``self`` itself) that another method of ``fn``'s class switches with
    ``.eval()``/``.train(False)``: their mode is object state, so at ``fn``'s entry (called from outside the
    file) it is whatever the last of those methods left; nothing is known of it."""
    cls = info.enclosing(fn, ast.ClassDef)
    if cls is None:
        return set()
    keys: set[str] = set()
    for other in cls.body:
        if other is fn or not isinstance(other, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(other):
            if not isinstance(node, ast.Call) or (m := method(node)) is None or m[1] not in ("eval", "train"):
                continue
            if m[1] == "train" and not (node.args and _static(node.args[0], {}) is False):
                continue
            if m[0] == "self" and _own_mode(node, info):
                keys.add("self")
            elif m[0].startswith("self.") and info.is_model(m[0]):
                keys.add(model_key(m[0]))
    return keys


def _is_method(fn: Function) -> bool:
    args = fn.args.posonlyargs + fn.args.args
    return bool(args) and args[0].arg == "self"


def _is_handler(fn: ast.AST) -> bool:
    """``@app.route("/predict")``, ``@router.post(...)``: run by a web framework for each request."""
    for d in getattr(fn, "decorator_list", []):
        target = d.func if isinstance(d, ast.Call) else d
        if isinstance(target, ast.Attribute) and target.attr in ROUTES:
            return True
    return False


def _not_module_arm(test: ast.AST) -> tuple[str, int] | None:
    """``if isinstance(net, nn.Module):`` -> (``net``, 1): the arm (0 body, 1 else) where it is no module."""
    negated = isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not)
    t = test.operand if negated and isinstance(test, ast.UnaryOp) else test
    if (
        isinstance(t, ast.Call)
        and text(t.func) == "isinstance"
        and len(t.args) == 2
        and "Module" in text(t.args[1])
        and isinstance(t.args[0], (ast.Name, ast.Attribute))
    ):
        return model_key(text(t.args[0])), 0 if negated else 1
    return None


def _copies_a_model(call: ast.Call, info: FileInfo) -> bool:
    """``target.load_state_dict(online.state_dict())`` (also through ``copy.deepcopy``): the weights of a model
    in memory, as a target network's sync; not a checkpoint loaded to predict with."""
    arg = call.args[0] if call.args else next((k.value for k in call.keywords if k.arg == "state_dict"), None)
    while isinstance(arg, ast.Call) and call_name(arg) in ("copy.deepcopy", "deepcopy", "dict") and arg.args:
        arg = arg.args[0]
    return (
        isinstance(arg, ast.Call)
        and (m := method(arg)) is not None
        and m[1] == "state_dict"
        and not arg.args
        and info.is_model(m[0])
    )


KEEPS_NOTHING = {"step", "zero_grad", "backward", "load_state_dict", "to", "cuda", "cpu", "train", "eval"}


def _written_in_place(v: ast.AST, info: FileInfo) -> set[str] | None:
    """The tensor an in-place method writes its arguments into: ``m.view(-1).index_add_(0, idx, p)`` -> ``m``,
    ``target[i].copy_(q)`` -> ``target`` (torch's trailing-underscore methods); not a module's function such as
    ``nn.init.xavier_uniform_(w)``."""
    if not (isinstance(v, ast.Call) and isinstance(v.func, ast.Attribute) and v.args):
        return None
    if not v.func.attr.endswith("_") or v.func.attr.startswith("_"):
        return None
    node: ast.AST = v.func.value
    while True:  # m.view(-1) -> m, target[i] -> target: views of the same storage
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            node = node.func.value
        elif isinstance(node, ast.Subscript):
            node = node.value
        else:
            break
    head = node
    while isinstance(head, ast.Attribute):
        head = head.value
    if not isinstance(head, ast.Name) or head.id in ("self", "cls") and node is head:
        return None
    if head.id in info.imported and head.id not in info.rebound:
        return None
    return _target_names(node) or None


def _holder(v: ast.AST, info: FileInfo) -> set[str] | None:
    """The object a method call may keep its arguments in: ``storage.feed({'q': q})``, ``buffer.push(s, a)``
    (a method this cannot see into, on an object of the code, not a module's function such as ``np.save`` or
    ``plt.plot``, not a model or an optimizer); None when the call is not one."""
    if not (isinstance(v, ast.Call) and isinstance(v.func, ast.Attribute) and (v.args or v.keywords)):
        return None
    if v.func.attr in KEEPS_NOTHING or v.func.attr in COLLECTORS:
        return None
    receiver = v.func.value
    chain = receiver
    while isinstance(chain, (ast.Attribute, ast.Subscript)):
        chain = chain.value
    if not isinstance(chain, ast.Name) or (isinstance(receiver, ast.Name) and receiver.id in ("self", "cls")):
        return None
    if chain.id in info.imported and chain.id not in info.rebound:
        return None  # np.save(path, x), plt.plot(x), wandb.log(...): a module's function
    recv = text(receiver)
    if info.is_model(recv) or info.is_optimizer(recv) or recv not in _value_sources(info):
        return None  # logger.info(loss): an object nothing reads values back from keeps nothing for a loss
    return _target_names(receiver) or None


def _value_sources(info: FileInfo) -> set[str]:
    """Objects the file reads values back from: a method whose result is used (``storage.extract(...)``,
    ``buffer.sample()``), an attribute or item read (``storage.q[i]``), memoised."""
    cached = info.__dict__.get("_value_sources")
    if cached is None:
        cached = set()
        parents = info.parents
        for n in info.nodes:
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute):
                if not isinstance(parents.get(n), ast.Expr):
                    cached.add(text(n.func.value))
            elif isinstance(n, (ast.Attribute, ast.Subscript)) and isinstance(n.ctx, ast.Load):
                parent = parents.get(n)
                if not (isinstance(parent, ast.Call) and parent.func is n):
                    cached.add(text(n.value))
        info.__dict__["_value_sources"] = cached
    return cached


DETACHING_CALLS = {"str", "float", "int", "bool", "round", "repr", "len", "jsonify", "json.dumps"}
DETACHING_METHODS = {"item", "tolist", "numpy", "format", "detach", "argmax", "argmin", "size"}


def _detaching(expr: ast.AST) -> bool:
    """A value no caller can backpropagate through: a number or text (``.item()``, ``f"..."``, ``str()``),
    a comparison, or a tuple/list/dict of those."""
    if isinstance(expr, (ast.JoinedStr, ast.Compare, ast.Constant)):
        return True
    if isinstance(expr, ast.Call):
        m = method(expr)
        if m is not None and m[1] in COLLECTORS:  # meters.update(loss=loss.item(), n=bs): numbers are kept
            args = list(expr.args) + [k.value for k in expr.keywords]
            return any(_detaching(a) for a in args) and all(
                _detaching(a) or isinstance(a, (ast.Name, ast.Constant)) for a in args
            )
        return (m is not None and m[1] in DETACHING_METHODS) or call_name(expr) in DETACHING_CALLS
    if isinstance(expr, (ast.Tuple, ast.List)):
        return bool(expr.elts) and all(_detaching(e) for e in expr.elts)
    if isinstance(expr, (ast.ListComp, ast.GeneratorExp)):
        return _detaching(expr.elt)
    if isinstance(expr, ast.Dict):
        return bool(expr.values) and all(_detaching(v) for v in expr.values)
    return False


def _pairs(fn: Function, call: ast.Call) -> list[tuple[str, ast.expr]]:
    params = [a.arg for a in fn.args.posonlyargs + fn.args.args]
    if params and params[0] in ("self", "cls") and isinstance(call.func, ast.Attribute):
        params = params[1:]
    pairs = list(zip(params, call.args)) if not any(isinstance(a, ast.Starred) for a in call.args) else []
    return pairs + [(k.arg, k.value) for k in call.keywords if k.arg]


def _bind(fn: Function, call: ast.Call, caller_env: dict) -> tuple[dict, dict]:
    """Constants and model aliases a call passes to a local function's parameters."""
    env = _defaults(fn, {})
    aliases = {}
    params = [a.arg for a in fn.args.posonlyargs + fn.args.args]
    if params and params[0] in ("self", "cls") and isinstance(call.func, ast.Attribute):
        params = params[1:]
    pairs = list(zip(params, call.args)) if not any(isinstance(a, ast.Starred) for a in call.args) else []
    pairs += [(k.arg, k.value) for k in call.keywords if k.arg]
    for param, arg in pairs:
        value = _static(arg, caller_env)
        if value is not UNKNOWN:
            env[param] = value
        else:
            env.pop(param, None)
        if isinstance(arg, (ast.Name, ast.Attribute)):
            aliases[param] = model_key(text(arg))
    return env, aliases


# ------------------------------------------------------------------------------------------------
# judging forwards


def status(frame: Frame, node: ast.AST, info: FileInfo, pos: int = 0, depth: int = 0) -> str:
    """``train`` | ``eval`` | ``escape`` (returned where nothing resolves it) | ``unused`` | ``unknown``."""
    if depth > MAX_DEPTH:
        return "unknown"
    sink_ids = {id(s) for s in frame.sinks}
    p: ast.AST | None = node
    while p is not None and not isinstance(p, ast.stmt):
        if id(p) in sink_ids:
            return "train"
        p = info.parents.get(p)
    stmt = p
    if stmt is None:
        return "unknown"
    targets: set[str] = set()
    if isinstance(stmt, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
        for t in stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]:
            targets |= _target_names(t)
    elif isinstance(stmt, (ast.For, ast.AsyncFor)):
        targets = _target_names(stmt.target)
    elif isinstance(stmt, (ast.With, ast.AsyncWith)):
        for item in stmt.items:
            if item.optional_vars is not None:
                targets |= _target_names(item.optional_vars)
    elif isinstance(stmt, ast.Return):
        q = info.parents.get(node)
        while q is not None and q is not stmt:
            if _detaching(q) or isinstance(q, ast.FormattedValue):
                return "eval"  # return f"{model(x).argmax().item()}": a number or text for the caller
            q = info.parents.get(q)
        return _escaped(frame, info, depth)
    elif isinstance(stmt, ast.Expr):
        v = stmt.value
        if v is node:
            return "unused"
        if isinstance(v, (ast.Yield, ast.YieldFrom)):
            return _escaped(frame, info, depth)
        if (
            isinstance(v, ast.Call)
            and isinstance(v.func, ast.Attribute)
            and (m := method(v))
            and m[1] in COLLECTORS
        ):
            targets = _target_names(v.func.value)
        elif (written := _written_in_place(v, info)) is not None:
            targets = written
        elif (held := _holder(v, info)) is not None:
            targets = held
        else:
            return "eval"  # print(model(x)), plot(...): an output
    else:
        return "eval"
    used = used_for_training(info)
    if (any("." in t for t in targets) or not _all_local(frame, targets, info)) and targets & used:
        return "unknown"  # kept on an object or in a global that a backward() elsewhere reads
    reaching = frame.reaching()
    entry = next(
        (i for i in range(pos, len(frame.seq)) if frame.seq[i][0] == "assign" and frame.seq[i][3] is stmt),
        None,
    )
    if entry is None or reaching[entry]:
        return "train" if entry is not None else "unknown"
    if frame.unsure()[entry]:
        return "unknown"  # kept by storage.feed(...) that a loss may read back: possibly training
    if targets & frame.stored(used):
        return "unknown"
    if targets & frame.escape():
        return _escaped(frame, info, depth)
    return "eval"


def used_for_training(info: FileInfo) -> set[str]:
    """Every name any backward() of the file reads, through assignments and the returns of the helpers whose
    results it reads (``loss = self.policy_loss()`` reads what ``policy_loss`` returns), flow-insensitive,
    memoised."""
    cached = getattr(info, "_used_for_training", None)
    if cached is None:
        all_frames = frames(info)
        cached = set()
        for frame in all_frames:
            cached |= _closure(frame.sinks, frame.assigns)
        callees = [f for f in all_frames if f.caller is not None and f.call is not None and f.escapes]
        changed = True
        while changed:
            changed = False
            for f in callees:
                if (
                    f.caller is not None
                    and f.call is not None
                    and _result_read(f.caller, f.call, cached, info)
                ):
                    new = _closure(f.escapes, f.assigns) - cached
                    if new:
                        cached |= new
                        changed = True
        info._used_for_training = cached
    return cached


def _result_read(frame: Frame, call: ast.Call, used: set[str], info: FileInfo) -> bool:
    """The value of ``call`` is given to backward() in ``frame`` or bound to a name that some backward() reads."""
    p: ast.AST | None = call
    while p is not None and not isinstance(p, ast.stmt):
        p = info.parents.get(p)
    if p is None:
        return False
    sinks = {id(s) for s in frame.sinks}
    q: ast.AST | None = call
    while q is not None and q is not p:
        if id(q) in sinks:
            return True
        q = info.parents.get(q)
    return any(targets & used for targets, value in frame.assigns if value is getattr(p, "value", None))


def _all_local(frame: Frame, targets: set[str], info: FileInfo) -> bool:
    """Every target is a local of the frame's function (always true at module level)."""
    fn = frame.scope
    if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        return True
    local = info.locals_of(fn)
    return all(t in local for t in targets)


def _escaped(frame: Frame, info: FileInfo, depth: int) -> str:
    if frame.caller is not None and frame.call is not None:
        s = status(frame.caller, frame.call, info, frame.call_pos, depth + 1)
        return "escape" if s == "unused" else s
    if _is_handler(frame.scope):
        return "eval"  # a web handler's result goes to the client, never to backward()
    if EVALUATION_NAME.search(getattr(frame.scope, "name", "")):
        return "escape"  # validation_step returning {'loss': ...}: a loss to report, not to backpropagate
    if any(re.search(r"loss\b|_loss|loss_", text(e), re.I) for e in frame.escapes):
        return "unknown"  # `return qf1_loss, qf2_loss` to a caller in another file: it is for training
    return "escape"


EVALUATION_NAME = re.compile(r"(^|_)(val|valid|validation|validate|eval|evaluate|evaluation|test)(_|$)", re.I)


def _passed_in(frame: Frame, key: str) -> bool:
    """The model is a parameter of the outermost function of the walk: callers outside this file own it."""
    while frame.caller is not None and key in frame.aliases:
        key, frame = frame.aliases[key], frame.caller
    if frame.caller is not None or key not in _params(frame.scope):
        return False
    # a function that walks a data loader evaluates (DETR's evaluate returns stats); a sampler returns outputs
    return not any(re.search(r"loader|dataset", text(a), re.I) for a in _params_nodes(frame.scope))


def _params_nodes(fn: ast.AST) -> list[ast.AST]:
    return [x for x in ast.walk(fn) if isinstance(x, (ast.arg, ast.Name))]


def _params(fn: ast.AST) -> set[str]:
    if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return set()
    a = fn.args
    return {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs}


def frames(info: FileInfo) -> list[Frame]:
    """Every walk of every scope, computed once per file."""
    cached = getattr(info, "_frames", None)
    if cached is None:
        cached = info._frames = Walker(info).run()
    return cached


def evaluation_forwards(info: FileInfo) -> Iterator[Forward]:
    """Forwards that are evaluation passes, each with the state the walk found at it."""
    for frame in frames(info):
        if frame.truncated or (frame.has_step and not frame.sinks):
            continue  # only part of it was walked, or a training scope whose backward we cannot see
        fn = frame.scope
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
            info.in_lightning_module(fn) or fn.name in ("forward", "__call__", "training_step")
        ):
            continue
        for fw in frame.forwards:
            s = status(frame, fw.node, info, fw.pos)
            if s == "eval":
                yield fw
            elif s == "escape" and (
                fw.mode == "eval" or fw.loaded or (fw.grad is False and not _passed_in(frame, fw.key))
            ):
                yield fw


def training_keys(info: FileInfo) -> set[str]:
    """Models some forward of which reaches backward() with autograd on (local and caller names)."""
    cached = getattr(info, "_training_keys", None)
    if cached is not None:
        return cached
    keys: set[str] = set()
    info._training_keys = keys
    info._training_forwards = set()
    for frame in frames(info):
        for fw in frame.forwards:
            if status(frame, fw.node, info, fw.pos) == "train":
                if not frame.sinks and not frame.has_step:  # trains through a caller, not in its own body
                    info._training_forwards.add(id(fw.node))
                if fw.grad is not False:
                    keys |= {fw.key, frame.root_key(fw.key)}
    return keys


def training_forward(info: FileInfo, node: ast.Call) -> bool:
    """This forward is in a helper with no backward() or step() of its own whose result some caller trains on:
    an extension of the model's forward shared by training and acting (SAC's sampling of actions), whose mode
    its callers set. A helper that trains in its own body unless a flag says not to (``run_epoch(train=False)``)
    is not one: its evaluating path is an evaluation."""
    training_keys(info)
    return id(node) in info._training_forwards
