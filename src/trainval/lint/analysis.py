"""What the rules need to know about one file: names, events in source order, local helpers.

The checker never runs the user's code. It reads the AST and works with *receivers*: the source
text of the object a method is called on (``opt``, ``self.optimizer``, ``optimizers[i]``), so that
aliases are told apart by what they are called on, not by a fixed name.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar, cast

if TYPE_CHECKING:
    from trainval.lint.flow import Frame

MODEL_WORD = re.compile(
    r"^(model|net|network|classifier|encoder|decoder|backbone|generator|discriminator|"
    r"net_?[gd]|critic|student|teacher)(_?[a-z0-9]*)?$",
    re.I,
)
NO_GRAD = {
    "torch.no_grad",
    "no_grad",
    "torch.inference_mode",
    "inference_mode",
    "torch.set_grad_enabled",
    "set_grad_enabled",
    "torch.autograd.no_grad",
    "torch.autograd.grad_mode.no_grad",
}
# a constructor named like a network class (``SegmentationModule``, ``ResNet``, ``GPTModel``), not a data or loss one
MODULE_CLASS = re.compile(
    r"(^|\.)(?![A-Za-z]*(Data|Loss|Loader|Criterion|Dataset))[A-Z]\w*(Module|Model|Net|Network)$"
)
LOOPS = (ast.For, ast.While, ast.AsyncFor)
Loop = ast.For | ast.While | ast.AsyncFor
PLAIN_HELPERS = {
    "range",
    "len",
    "int",
    "float",
    "list",
    "tuple",
    "zip",
    "enumerate",
    "min",
    "max",
    "sum",
    "dict",
    "super",
    "getattr",
    "math.sqrt",
    "np.sqrt",
}
SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)
Function = ast.FunctionDef | ast.AsyncFunctionDef  # a def of the file (its events, helpers, locals)
_Node = TypeVar("_Node", bound=ast.AST)


@dataclass
class Event:
    kind: str  # backward | step | zero | eval | train | call | model_call | load_state
    receiver: str  # source text of the receiver ("" when none)
    node: ast.stmt | ast.expr  # the call (a statement for a zeroing ``p.grad = None``)
    order: tuple[int, int]
    in_if: bool = False  # inside an if/else (conditional) relative to the walked block
    has_args: bool = False


_TEXT: dict[int, tuple[ast.AST, str]] = {}  # per file (cleared by FileInfo): unparsing is the hot spot


def text(node: ast.AST) -> str:
    if isinstance(node, ast.Name):  # what ast.unparse gives, without its visitor: most texts are these
        return node.id
    hit = _TEXT.get(id(node))
    if hit is not None and hit[0] is node:
        return hit[1]
    if isinstance(node, ast.Attribute) and isinstance(node.value, (ast.Name, ast.Attribute)):
        base = text(node.value)  # a.b.c: an atom, never parenthesised by unparse
        if base:
            out = f"{base}.{node.attr}"
            _TEXT[id(node)] = (node, out)
            return out
    try:
        out = ast.unparse(node)
    except Exception:  # noqa: BLE001 - RecursionError on huge expressions, odd nodes: no text
        out = ""
    _TEXT[id(node)] = (node, out)
    return out


def call_name(call: ast.Call) -> str:
    return text(call.func)


def model_key(receiver: str) -> str:
    """The name a model's mode is kept under: ``self.model.encoder`` -> ``model``, ``nets[i]`` -> ``nets``."""
    parts = receiver.split(".")
    if len(parts) > 1 and parts[0] in ("self", "cls"):
        parts = parts[1:]
    return parts[0].split("[")[0].split("(")[0]


def method(call: ast.Call) -> tuple[str, str] | None:
    """``(receiver, method)`` of ``recv.method(...)``."""
    if isinstance(call.func, ast.Attribute):
        return text(call.func.value), call.func.attr
    return None


WRAPS_NO_GRAD = re.compile(r"(inference_mode|no_grad)$", re.I)


def wraps_no_grad(decorator: ast.AST, info: FileInfo | None = None) -> bool:
    """A decorator that runs the function without autograd although it is not torch's own: named like one
    (``@smart_inference_mode()``, ``@torch_no_grad``), or a function of this file whose body applies
    ``no_grad``/``inference_mode`` (and never ``enable_grad``)."""
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    name = text(target)
    if name in NO_GRAD or not name:
        return False
    if WRAPS_NO_GRAD.search(name.split(".")[-1]):
        return True
    if info is not None and isinstance(target, ast.Name):
        for n in info.nodes:  # infer = torch.inference_mode(); @infer / with infer:
            if (
                isinstance(n, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == target.id for t in n.targets)
                and is_no_grad_ctx(n.value)
            ):
                return True
        for fn in info.functions.get(target.id, []):
            body = info.segment(fn) or ""
            if re.search(r"\b(no_grad|inference_mode)\b", body) and "enable_grad" not in body:
                return True
    return False


def is_no_grad_ctx(expr: ast.AST, info: FileInfo | None = None) -> bool:
    if info is not None and wraps_no_grad(expr, info):
        return True
    target = expr.func if isinstance(expr, ast.Call) else expr
    name = text(target)
    if name in NO_GRAD:
        if name.endswith("set_grad_enabled") and isinstance(expr, ast.Call):
            return bool(expr.args) and isinstance(expr.args[0], ast.Constant) and expr.args[0].value is False
        return True
    return False


_CHILDREN: dict[ast.AST, list[ast.AST]] = {}  # per file (set by FileInfo): each node's children, found once


def _children_of(tree: ast.AST) -> tuple[list[ast.AST], dict[ast.AST, list[ast.AST]]]:
    """Every node of ``tree`` in :func:`ast.walk`'s order, and each node's children (one pass, no generators)."""
    nodes = [tree]
    children: dict[ast.AST, list[ast.AST]] = {}
    AST, i = ast.AST, 0
    while i < len(nodes):
        n = nodes[i]
        i += 1
        kids = []
        for name in n._fields:
            v = getattr(n, name, None)
            if isinstance(v, AST):
                kids.append(v)
            elif isinstance(v, list):
                kids += [x for x in v if isinstance(x, AST)]
        children[n] = kids
        nodes += kids
    return nodes, children


def walk(node: ast.AST) -> list[ast.AST]:
    """:func:`ast.walk` (same nodes, same order) over the current file's children table: the hot walks are cheap."""
    table = _CHILDREN
    out, i = [node], 0
    while i < len(out):
        kids = table.get(out[i])
        out += kids if kids is not None else list(ast.iter_child_nodes(out[i]))
        i += 1
    return out


def _walk_outside_lambdas(node: ast.AST) -> Iterator[ast.AST]:
    todo = [node]
    while todo:
        n = todo.pop()
        if isinstance(n, ast.Lambda):
            continue
        yield n
        kids = _CHILDREN.get(n)
        todo.extend(kids if kids is not None else ast.iter_child_nodes(n))


def _combine(verdicts: list[tuple[str, str]]) -> tuple[str, str]:
    known = sorted({w for v, why in verdicts if v == "known" for w in why.split(", ")})
    if known:
        return "known", ", ".join(known)
    return next(((v, why) for v, why in verdicts if v == "likely"), ("free", ""))


def _ordered_calls(node: ast.AST) -> list[ast.Call]:
    calls = [n for n in walk(node) if isinstance(n, ast.Call)]
    # inner calls (receivers, arguments) run before the call that contains them
    return sorted(calls, key=lambda c: (c.end_lineno or c.lineno, c.end_col_offset or c.col_offset))


class FileInfo:
    """Facts about one module: optimizers, schedulers, models, local functions, parents."""

    # per-file results that flow.py and rules.py compute on first use (absent until then)
    _frames: list[Frame]
    _used_for_training: set[str]
    _training_keys: set[str]
    _training_forwards: set[int]
    _backwarded: set[str]

    def __init__(self, tree: ast.Module, source: str):
        global _CHILDREN
        _TEXT.clear()
        self.tree, self.source = tree, source
        self._fn_events: dict[ast.AST, list[Event]] = {}
        self._reaches: dict[tuple[ast.AST, str], bool] = {}
        self._expr_cache: dict[tuple[ast.AST, bool], list[Event]] = {}
        # every node once, in ast.walk's order; the rules scan this list
        self.nodes, self.children = _children_of(tree)
        _CHILDREN = self.children
        self.parents: dict[ast.AST, ast.AST] = {
            child: parent for parent, kids in self.children.items() for child in kids
        }
        self.functions: dict[str, list[Function]] = {}
        for node in self.nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.functions.setdefault(node.name, []).append(node)
        self.plain_callables: set[str] = set(self.functions)  # names bound to a def or a lambda
        self.imported: set[str] = set()  # modules and names brought in by imports (torch, F, model_zoo)
        self.import_source: dict[str, str] = {}  # name -> the module it comes from
        for node in self.nodes:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Lambda):
                self.plain_callables |= {text(t) for t in node.targets}
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                self.imported |= {(a.asname or a.name).split(".")[0] for a in node.names}
                for a in node.names:
                    self.import_source[(a.asname or a.name).split(".")[0]] = (
                        (node.module or "") if isinstance(node, ast.ImportFrom) else a.name
                    )
        self.classes: dict[str, ast.ClassDef] = {n.name: n for n in self.nodes if isinstance(n, ast.ClassDef)}
        # imported names the file rebinds (`import model` then `model = model.RNNModel(...)`): variables, not modules
        stored = {n.id for n in self.nodes if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        self.rebound: set[str] = self.imported & stored
        self._mode_effects: dict[ast.AST, dict[str, str]] = {}
        self.optimizers: set[str] = set()
        self.schedulers: set[str] = set()
        self.models: set[str] = set()
        self.zeroed: set[str] = set()
        for node in self.nodes:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
                made = call_name(node.value)
                for target in node.targets:
                    name = text(target)
                    if "lr_scheduler" in made or made.endswith(("LR", "Scheduler", "LROnPlateau")):
                        self.schedulers.add(name)
                    elif re.search(
                        r"(^|\.)optim\.|Optimizer$|^(SGD|Adam|AdamW|RMSprop|Adagrad|LBFGS)$", made
                    ):
                        self.optimizers.add(name)
                    elif (
                        MODULE_CLASS.search(made)
                        and made.split(".")[-1] not in self.classes
                        and isinstance(target, (ast.Name, ast.Attribute))
                    ):  # segmentation_module = SegmentationModule(encoder, decoder), a class from elsewhere
                        self.models.add(name)
            if isinstance(node, ast.Call) and (m := method(node)):
                recv, name = m
                if name == "zero_grad":
                    self.zeroed.add(recv)
                if name in (
                    "train",
                    "eval",
                    "parameters",
                    "named_parameters",
                    "load_state_dict",
                    "state_dict",
                ):
                    if name != "train" or not node.args or isinstance(node.args[0], ast.Constant):
                        self.models.add(recv)
        self.optimizers |= {r for r in self.zeroed if self._looks_like_optimizer(r)}
        self.models -= self.optimizers | self.schedulers
        self.models = {m for m in self.models if not re.search(r"optim|sched|scaler|loader|dataset", m, re.I)}

    @staticmethod
    def _looks_like_optimizer(recv: str) -> bool:
        return bool(re.search(r"opt", recv, re.I))

    def is_optimizer(self, recv: str) -> bool:
        if recv in self.schedulers or re.search(r"sched|scaler|lr_", recv, re.I):
            return False
        return recv in self.optimizers or recv in self.zeroed or self._looks_like_optimizer(recv)

    def is_model(self, name: str) -> bool:
        """A model: something the file calls .train()/.eval()/.parameters() on, or named like one."""
        base = name.split("(")[0]
        if base in self.models:
            return True
        last = base.split(".")[-1]
        last = last.split("[")[0]
        return bool(MODEL_WORD.match(last)) and not re.search(r"optim|sched|loss|scaler", base, re.I)

    def locals_of(self, fn: Function | ast.Lambda) -> set[str]:
        """Parameters and names a function binds (not its nested functions'), memoised."""
        cache = self.__dict__.setdefault("_locals", {})
        if fn not in cache:
            names = {a.arg for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs}
            names |= {a.arg for a in (fn.args.vararg, fn.args.kwarg) if a is not None}
            todo: list[ast.AST] = (
                list(fn.body) if isinstance(fn.body, list) else [fn.body]
            )  # a lambda's: one expression
            while todo:
                n = todo.pop()
                if isinstance(n, SCOPES):
                    continue
                if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                    names.add(n.id)
                kids = _CHILDREN.get(n)
                todo.extend(kids if kids is not None else ast.iter_child_nodes(n))
            cache[fn] = names
        return cache[fn]

    MODE_FREE_LAYERS = re.compile(
        r"^(torch\.)?(nn\.)?(Linear|Bilinear|Conv[123]d|ConvTranspose[123]d|ReLU|LeakyReLU|PReLU|GELU|SiLU|ELU|Tanh|"
        r"Sigmoid|Softmax|LogSoftmax|Identity|Flatten|Unflatten|Embedding|EmbeddingBag|LayerNorm|GroupNorm|RMSNorm|"
        r"LSTM|GRU|RNN|LSTMCell|GRUCell|RNNCell|Sequential|ModuleList|ModuleDict|ParameterList|Parameter|"
        r"MaxPool[123]d|AvgPool[123]d|AdaptiveAvgPool[123]d|AdaptiveMaxPool[123]d|Upsample|PixelShuffle|"
        r"ZeroPad2d|ReflectionPad2d|ReplicationPad2d|ConstantPad[123]d|Hardtanh|Softplus|MultiheadAttention)$"
    )
    MODE_DEPENDENT = re.compile(r"BatchNorm|InstanceNorm|Dropout|dropout|drop_path|DropPath|\.training|RReLU")

    def evaluates_in_init(self, call: ast.Call) -> bool:
        """``Cls(...)`` where ``Cls`` is a class of this file whose ``__init__`` calls ``.eval()``."""
        name = text(call.func)
        if name not in self.classes:
            return False  # (a class of this file by that name: self.classes has the last of them)
        for cls in (n for n in self.nodes if isinstance(n, ast.ClassDef) and n.name == name):
            for fn in cls.body:
                if (
                    isinstance(fn, ast.FunctionDef)
                    and fn.name == "__init__"
                    and any(
                        isinstance(c, ast.Call)
                        and isinstance(c.func, ast.Attribute)
                        and c.func.attr == "eval"
                        for c in ast.walk(fn)
                    )
                ):
                    return True
        return False

    def from_hugging_face(self, call: ast.AST) -> bool:
        """``AutoModel.from_pretrained(...)`` and friends from transformers/diffusers/peft/timm (eval mode)."""
        base = text(call).split(".")[0].split("(")[0]
        source = self.import_source.get(base, "")
        return source.split(".")[0] in (
            "transformers",
            "diffusers",
            "peft",
            "sentence_transformers",
        ) or base.startswith("Auto")

    MODE_LAYER = re.compile(
        r"\b\w*(?:BatchNorm|InstanceNorm|Dropout|DropPath|drop_path|RReLU)\w*|\bF\.dropout\w*|"
        r"\bself\.training\b"
    )
    # InstanceNorm normalises with each sample's own statistics in both modes unless it keeps running ones
    INSTANCE_NORM = re.compile(r"InstanceNorm\w*$")
    # config.network_fn(), net_factory(), model_cls(): a callable that builds a module, not a module run
    FACTORY = re.compile(r"_(fn|func|factory|builder|cls|class|ctor|constructor)$", re.I)
    LOSS_CLASS = re.compile(r"(Loss|Criterion)$")  # SplitCrossEntropyLoss, AdaptiveSoftmaxLoss: not models
    LOSS_LIKE = re.compile(r"loss|criterion", re.I)
    UNSEEN = "likely", "most models hold Dropout or BatchNorm (its layers are not visible in this file)"

    def mode_free(self, receiver: str) -> bool:
        return self.mode_layers(receiver)[0] == "free"

    def mode_layers(self, receiver: str, alias: str | None = None) -> tuple[str, str]:
        """Whether ``receiver``'s train/eval mode matters, and why: ``("free", "")`` when the model is built in
        this file only from layers without train/eval behaviour (no BatchNorm, Dropout, ``self.training``...);
        ``("known", "Dropout, BatchNorm2d")`` when such layers are seen; ``("likely", why)`` when the layers are
        not visible here (a class from elsewhere, a pickled model, a parameter) or it is built with dropout
        arguments. ``alias`` is the caller's name for a parameter (``evaluate(model)`` called with ``net``).
        """
        cache = self.__dict__.setdefault("_mode_layers_cache", {})
        key = (receiver, alias)
        if key not in cache:
            cache[key] = self.UNSEEN  # in progress (a model built from itself)
            verdict = self._mode_layers(receiver, alias)
            if verdict[0] == "likely" and self.reinforcement_learning:
                verdict = "free", ""  # policy and value networks conventionally hold neither (see below)
            cache[key] = verdict
        return cache[key]

    @property
    def reinforcement_learning(self) -> bool:
        """The file is a reinforcement-learning agent: it binds a reward (``obs, reward, done, _ = env.step(a)``,
        ``reward_batch``, a ``rewards`` parameter). Policy and value networks (DQN, actor-critic, PPO, SAC, as in
        Stable-Baselines3, Spinning Up and the textbooks) conventionally hold no BatchNorm and no Dropout, so a
        network whose layers are not visible here is not taken to hold them; one built here with them still is."""
        cache = self.__dict__
        if "_rl" not in cache:
            bound = (
                n.id if isinstance(n, ast.Name) else n.attr if isinstance(n, ast.Attribute) else n.arg
                for n in self.nodes
                if (isinstance(n, (ast.Name, ast.Attribute)) and isinstance(n.ctx, ast.Store))
                or isinstance(n, ast.arg)
            )
            cache["_rl"] = any("reward" in name.lower() for name in bound)
        return cache["_rl"]

    def _mode_layers(self, receiver: str, alias: str | None) -> tuple[str, str]:
        name = receiver.split("(")[0]
        made = self._constructions(name)
        if not made and alias and alias != model_key(name):
            made = self._constructions(alias) or self._constructions(f"self.{alias}")
        if not made and "." in name:
            # model.encoder(x): a part of a model holds no more mode-dependent layers than the whole
            owner = name.rsplit(".", 1)[0]
            if owner not in ("self", "cls"):
                verdict = self.mode_layers(owner)
                if verdict[0] != "likely":
                    return verdict
        if not made:
            if self.LOSS_LIKE.search(name.split(".")[-1]):
                return "free", ""  # a loss object with parameters (adaptive softmax, SplitCrossEntropyLoss)
            return self.UNSEEN
        verdicts = [self._built_by(call) for call in made]
        known = sorted({w for v, why in verdicts if v == "known" for w in why.split(", ")})
        if known:
            return "known", ", ".join(known)
        if all(v == "free" for v, _ in verdicts):
            return "free", ""
        if self.LOSS_LIKE.search(name.split(".")[-1]):
            return "free", ""
        return next((v, why) for v, why in verdicts if v == "likely")

    def _constructions(self, name: str) -> list[ast.AST]:
        """The values assigned to ``name`` in this file (``a, b = A(), B()`` element by element)."""
        out = []
        for n in self.nodes:
            if isinstance(n, ast.Assign):
                for t in n.targets:
                    if text(t) == name:
                        out.append(n.value)
                    elif (
                        isinstance(t, (ast.Tuple, ast.List))
                        and isinstance(n.value, (ast.Tuple, ast.List))
                        and len(t.elts) == len(n.value.elts)
                    ):
                        out += [v for e, v in zip(t.elts, n.value.elts) if text(e) == name]
            elif isinstance(n, ast.AnnAssign) and n.value is not None and text(n.target) == name:
                out.append(n.value)
        return [v for v in out if isinstance(v, ast.Call)]

    @staticmethod
    def tracks_running_stats(call: ast.AST | None) -> bool:
        """``nn.InstanceNorm2d(c, track_running_stats=True)``: the only InstanceNorm whose eval mode differs
        (without a call to read, as in a ``safe_globals`` list, it may: counted)."""
        if not isinstance(call, ast.Call):
            return True
        value = next((k.value for k in call.keywords if k.arg == "track_running_stats"), None)
        if value is None:
            return len(call.args) >= 5 and not (
                isinstance(call.args[4], ast.Constant) and not call.args[4].value
            )
        return not (isinstance(value, ast.Constant) and not value.value)

    def _layer_verdict(self, callee: str, seen: set[str], call: ast.AST | None = None) -> tuple[str, str]:
        if callee in self.classes:
            return self._class_verdict(callee, seen)
        if (
            self.MODE_FREE_LAYERS.match(callee)
            or callee in PLAIN_HELPERS
            or re.match(r"^torch\.(zeros|ones|randn|rand|empty|tensor|arange|full|eye)$", callee)
            or self.LOSS_CLASS.search(callee.split(".")[-1])
            or (self.INSTANCE_NORM.search(callee) and not self.tracks_running_stats(call))
        ):
            return "free", ""
        m = self.MODE_LAYER.search(callee)
        if m:
            return "known", callee.split(".")[-1]
        return "likely", f"it holds {callee}(...), whose layers are not visible in this file"

    def _built_by(self, call: ast.AST) -> tuple[str, str]:
        inner = call
        while (
            isinstance(inner, ast.Call)
            and isinstance(inner.func, ast.Attribute)
            and inner.func.attr
            in ("to", "cuda", "cpu", "half", "float", "double", "bfloat16", "requires_grad_")
        ):
            inner = inner.func.value
        if not isinstance(inner, ast.Call):
            return self.UNSEEN
        callee = text(inner.func)
        if callee.endswith(".load") and (
            callee.split(".")[0] in ("torch", "t") or self.import_source.get(callee.split(".")[0]) == "torch"
        ):
            path = inner.args[0] if inner.args and isinstance(inner.args[0], ast.Constant) else None
            for n in self.nodes:  # torch.save(net1, "net.pkl") ... torch.load("net.pkl"): net1 again
                if (
                    path is not None
                    and isinstance(n, ast.Call)
                    and call_name(n).endswith(".save")
                    and len(n.args) >= 2
                    and isinstance(n.args[1], ast.Constant)
                    and n.args[1].value == path.value
                    and isinstance(n.args[0], (ast.Name, ast.Attribute))
                ):
                    return self.mode_layers(text(n.args[0]))
            return self._pickled()
        base = callee[: -len(".from_pretrained")] if callee.endswith(".from_pretrained") else None
        if base is not None and self.MODE_FREE_LAYERS.match(base):
            return "free", ""  # nn.Embedding.from_pretrained(weights): its arguments are data, not layers
        if self.MODE_FREE_LAYERS.match(callee):
            # nn.Sequential(...) and friends: the layers passed in decide
            verdicts = [
                self._layer_verdict(text(c.func), set(), c)
                for c in _walk_outside_lambdas(inner)
                if isinstance(c, ast.Call) and c is not inner
            ]
            return _combine(verdicts)
        if callee in self.classes:
            return self._class_verdict(callee, set())
        if self.LOSS_CLASS.search(callee.split(".")[-1]):
            return "free", ""  # crit = SplitCrossEntropyLoss(...): a loss object, whatever its name
        if self.INSTANCE_NORM.search(callee) and not self.tracks_running_stats(inner):
            return "free", ""
        if self.MODE_LAYER.search(callee):
            return "known", callee.split(".")[-1]
        drop = [k.arg for k in inner.keywords if k.arg and re.search(r"drop|batch_?norm|\bbn\b", k.arg, re.I)]
        drop += [text(a) for a in inner.args if re.search(r"drop|batch_?norm", text(a), re.I)]
        if drop:
            return (
                "likely",
                f"it is built with {drop[0]}{'=...' if drop[0].isidentifier() and '.' not in drop[0] and any(k.arg == drop[0] for k in inner.keywords) else ''}: likely Dropout",
            )
        return "likely", f"most models hold Dropout or BatchNorm ({callee}(...) is not defined in this file)"

    def _pickled(self) -> tuple[str, str]:
        """A whole model unpickled by torch.load: its classes are those the file allows with safe_globals."""
        allowed: list[str] = []
        unseen = False  # a list this cannot read: its classes may hold anything
        for n in self.nodes:
            if (
                isinstance(n, ast.Call)
                and call_name(n).split(".")[-1] in ("add_safe_globals", "safe_globals")
                and n.args
            ):
                elts = self._literal_list(n.args[0])
                if elts is None:
                    unseen = True
                else:
                    allowed += [text(e) for e in elts]
        if not allowed or unseen:
            return (
                "likely",
                "most models hold Dropout or BatchNorm (a pickled model: its layers are not visible here)",
            )
        return _combine([self._layer_verdict(a, set()) for a in allowed])

    def _literal_list(self, node: ast.AST) -> list[ast.expr] | None:
        """The items of ``[A, B]``, or of a name bound only to such literals and never added to
        (``allowed = [nn.Linear, nn.ReLU]; add_safe_globals(allowed)``); None when not known here."""
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            return list(node.elts)
        if not isinstance(node, ast.Name):
            return None
        out: list[ast.expr] = []
        for n in self.nodes:
            if isinstance(n, ast.Assign) and any(text(t) == node.id for t in n.targets):
                if not isinstance(n.value, (ast.List, ast.Tuple, ast.Set)):
                    return None
                out += n.value.elts
            elif isinstance(n, ast.AugAssign) and text(n.target) == node.id:
                return None
            elif isinstance(n, ast.Call) and (m := method(n)) and m[0] == node.id:
                return None  # allowed.append(Net): added to where this does not follow
        return out or None

    def _class_verdict(self, cls_name: str, seen: set[str]) -> tuple[str, str]:
        if cls_name in seen:
            return "free", ""
        seen.add(cls_name)
        cls = self.classes[cls_name]
        source = self.segment(cls) or "Dropout"
        found = sorted(
            {
                m.group(0).split(".")[-1].replace("training", "self.training")
                for m in self.MODE_LAYER.finditer(source)
                if not self.INSTANCE_NORM.search(m.group(0))
            }
            | {
                call_name(c).split(".")[-1]
                for c in ast.walk(cls)
                if isinstance(c, ast.Call)
                and self.INSTANCE_NORM.search(call_name(c))
                and self.tracks_running_stats(c)
            }
        )
        found += [] if found or not re.search(r"dropout", source) else ["dropout"]
        if found:
            return "known", ", ".join(found)
        verdicts = []
        for b in cls.bases:
            if text(b) in self.classes:
                verdicts.append(self._class_verdict(text(b), seen))
            elif text(b) not in ("nn.Module", "torch.nn.Module", "Module"):
                verdicts.append(("likely", f"it derives from {text(b)}, which is not defined in this file"))
        # what the module is built from: every call in a `self.x = ...` value
        built = [
            n.value
            for n in ast.walk(cls)
            if isinstance(n, (ast.Assign, ast.AnnAssign))
            and n.value is not None
            and any(
                text(t).startswith("self.") for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
            )
        ]
        data: set[ast.AST] = (
            set()
        )  # the arguments of nn.Embedding.from_pretrained(...) are weights, not layers
        for call in (c for v in built for c in _walk_outside_lambdas(v) if isinstance(c, ast.Call)):
            callee = text(call.func)
            if call in data:
                continue
            if callee.endswith(".from_pretrained") and self.MODE_FREE_LAYERS.match(
                callee[: -len(".from_pretrained")]
            ):
                data |= {c for a in call.args + [k.value for k in call.keywords] for c in ast.walk(a)}
                continue
            if isinstance(call.func, ast.Attribute) and isinstance(call.func.value, ast.Call):
                continue  # torch.zeros(...).uniform_(): a method of a value built by an inner call
            if callee.startswith("self.") or re.search(r"(^|\.)optim\.|Optimizer$|lr_scheduler", callee):
                continue  # self.parameters(), optim.Adam(...): the module's own methods and its optimizer
            verdicts.append(self._layer_verdict(callee, seen, call))
        return _combine(verdicts)

    def is_module(self, name: str, at: ast.AST | None = None) -> bool:
        """A model that is an ``nn.Module``: named or used like one, and not a plain function of this file
        (nor, at ``at``, a module the file imported under that name)."""
        base = name.split("(")[0]
        if base in self.classes:
            return False  # discriminator(): a class of this file, whatever its case, is built here, not run
        head = base.split(".")[0]
        if (
            not self.is_model(base)
            or base in self.plain_callables
            or (head in self.imported and self.names_import(head, at))
            # config.network_fn(): a callable named as a builder, called with no input, builds a module; a
            # forward takes a batch (value_fn(obs) stays a forward)
            or (
                self.FACTORY.search(base.split(".")[-1])
                and isinstance(at, ast.Call)
                and not at.args
                and not at.keywords
            )
        ):
            return False
        # Generator(...) builds a module, it does not run one; self.G(x) runs the G it calls .eval() on
        return base in self.models or not base.split(".")[-1][:1].isupper()

    def names_import(self, name: str, at: ast.AST | None) -> bool:
        """``name`` (imported) still stands for what the import bound where ``at`` reads it: ``import model``
        then ``model = model.RNNModel(...)`` is the module in that assignment's value and before it at module
        level, a model after it and in functions (which run later); a function that binds ``name`` itself
        (a parameter, an assignment) reads its own value."""
        kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
        scope = None if at is None else cast("Function | ast.Lambda | None", self.enclosing(at, kinds))
        while scope is not None:
            declared_global = any(isinstance(n, ast.Global) and name in n.names for n in ast.walk(scope))
            if name in self.locals_of(scope) and not declared_global:
                return False
            scope = cast("Function | ast.Lambda | None", self.enclosing(scope, kinds))
        if name not in self.rebound:
            return True
        if at is None:
            return False
        stores = self._module_stores(name)
        if not stores:
            return True  # rebound only inside functions, as their own locals
        if self.enclosing(at, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) is not None:
            return False
        return (getattr(at, "lineno", 0), getattr(at, "col_offset", 0)) < min(stores)

    def _module_stores(self, name: str) -> list[tuple[int, int]]:
        """Where the module body (or a function declaring it global) binds ``name``: the end of the binding
        statement, after its value has been read."""
        cache = self.__dict__.setdefault("_module_stores_cache", {})
        if name not in cache:
            out = []
            for n in self.nodes:
                if not (isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Store)):
                    continue
                fn = self.enclosing(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                if fn is not None and not any(
                    isinstance(g, ast.Global) and name in g.names for g in ast.walk(fn)
                ):
                    continue
                stmt = self.enclosing(n, (ast.stmt,))
                if isinstance(stmt, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                    out.append((stmt.end_lineno or stmt.lineno, stmt.end_col_offset or 0))
                else:
                    out.append((n.lineno, n.col_offset))
            cache[name] = out
        return cache[name]

    def enclosing(self, node: ast.AST, kinds: type[_Node] | tuple[type[_Node], ...]) -> _Node | None:
        parent = self.parents.get(node)
        while parent is not None and not isinstance(parent, kinds):
            parent = self.parents.get(parent)
        return parent

    def local_functions(self, call: ast.Call) -> list[Function]:
        """Functions of this file a call may reach: ``f(...)`` or ``self.f(...)``."""
        func = call.func
        if isinstance(func, ast.Name):
            return self.functions.get(func.id, [])
        if (
            isinstance(func, ast.Attribute)
            and isinstance(func.value, ast.Name)
            and func.value.id in ("self", "cls")
        ):
            return self.functions.get(func.attr, [])
        return []

    def events(self, body: list[ast.stmt] | ast.AST, in_if: bool = False) -> Iterator[Event]:
        """Calls of interest in source (execution) order; nested functions and classes are skipped."""
        stmts = body if isinstance(body, list) else [body]
        for stmt in stmts:
            yield from self._stmt_events(stmt, in_if)

    def _stmt_events(self, stmt: ast.AST, in_if: bool) -> Iterator[Event]:
        if isinstance(stmt, SCOPES):
            return
        if isinstance(stmt, ast.If):
            yield from self._expr_events(stmt.test, in_if)
            yield from self.events(stmt.body, True)
            yield from self.events(stmt.orelse, True)
            return
        if isinstance(stmt, (ast.For, ast.AsyncFor)):
            yield from self._expr_events(stmt.iter, in_if)
            yield from self.events(stmt.body, in_if)
            yield from self.events(stmt.orelse, in_if)
            return
        if isinstance(stmt, ast.While):
            yield from self._expr_events(stmt.test, in_if)
            yield from self.events(stmt.body, in_if)
            return
        if isinstance(stmt, (ast.With, ast.AsyncWith)):
            for item in stmt.items:
                yield from self._expr_events(item.context_expr, in_if)
            yield from self.events(stmt.body, in_if)
            return
        if isinstance(stmt, ast.Try):
            yield from self.events(stmt.body, in_if)
            for h in stmt.handlers:
                yield from self.events(h.body, True)
            yield from self.events(stmt.orelse, in_if)
            yield from self.events(stmt.finalbody, in_if)
            return
        yield from self._expr_events(stmt, in_if)
        if (
            isinstance(stmt, ast.Assign)
            and any(isinstance(t, ast.Attribute) and t.attr == "grad" for t in stmt.targets)
            and isinstance(stmt.value, ast.Constant)
            and stmt.value.value is None
        ):
            yield Event("zero", "", stmt, (stmt.lineno, stmt.col_offset), in_if)

    def _expr_events(self, node: ast.AST, in_if: bool) -> Iterator[Event]:
        """Memoised per node (a nested loop's statements are visited once per enclosing loop and function)."""
        key = (node, in_if)
        hit = self._expr_cache.get(key)
        if hit is None:
            hit = self._expr_cache[key] = list(self._expr_events_of(node, in_if))
        return iter(hit)

    def _expr_events_of(self, node: ast.AST, in_if: bool) -> Iterator[Event]:
        for call in _ordered_calls(node):
            if any(isinstance(p, SCOPES) for p in self._parents_until(call, node)):
                continue
            order = (call.lineno, call.col_offset)
            m = method(call)
            if m:
                recv, name = m
                if name == "backward":
                    yield Event("backward", recv, call, order, in_if)
                    continue
                if name == "step":
                    if self.is_optimizer(recv) and "scaler" not in recv.lower():
                        yield Event(
                            "step", recv, call, order, in_if, has_args=bool(call.args or call.keywords)
                        )
                    elif "scaler" in recv.lower() and call.args:  # GradScaler.step(optimizer)
                        yield Event("step", text(call.args[0]), call, order, in_if)
                    continue
                if name == "zero_grad":
                    yield Event("zero", recv, call, order, in_if)
                    continue
                if name in ("eval", "train") and not call.keywords:
                    if name == "train" and call.args and not (isinstance(call.args[0], ast.Constant)):
                        continue
                    mode = (
                        "eval"
                        if name == "eval"
                        or (
                            call.args
                            and isinstance(call.args[0], ast.Constant)
                            and call.args[0].value is False
                        )
                        else "train"
                    )
                    yield Event(mode, recv, call, order, in_if)
                    continue
                if name == "load_state_dict":
                    yield Event("load_state", recv, call, order, in_if)
                    continue
            fname = call_name(call)
            if self.is_model(fname) and not m:
                yield Event("model_call", fname, call, order, in_if)
            elif (
                isinstance(call.func, ast.Attribute)
                and call.func.attr == "forward"
                and self.is_model(text(call.func.value))
            ):
                yield Event("model_call", text(call.func.value), call, order, in_if)
            elif m and self.is_model(fname):  # self.model(x)
                yield Event("model_call", fname, call, order, in_if)
            if self.local_functions(call):
                yield Event("call", fname, call, order, in_if)

    def _parents_until(self, node: ast.AST, top: ast.AST) -> Iterator[ast.AST]:
        p = self.parents.get(node)
        while p is not None and p is not top:
            yield p
            p = self.parents.get(p)

    # -- summaries of local helper functions (followed a few calls deep)

    def fn_events(self, fn: Function) -> list[Event]:
        """:meth:`events` of a function's body, computed once."""
        if fn not in self._fn_events:
            self._fn_events[fn] = list(self.events(fn.body))
        return self._fn_events[fn]

    def reaches(
        self, call: ast.Call, kind: str, receiver: str | None = None, depth: int = 3, seen=None
    ) -> bool:
        if receiver is None and seen is None:  # the common question, memoised
            key = (call, kind)
            if key not in self._reaches:
                self._reaches[key] = self.reaches(call, kind, None, depth, set())
            return self._reaches[key]
        seen = seen if seen is not None else set()
        for fn in self.local_functions(call):
            if fn in seen:
                continue
            seen.add(fn)
            for ev in self.fn_events(fn):
                if ev.kind == kind and (receiver is None or ev.receiver == receiver or not ev.receiver):
                    return True
                if (
                    ev.kind == "call"
                    and isinstance(ev.node, ast.Call)
                    and depth > 0
                    and self.reaches(ev.node, kind, receiver, depth - 1, seen)
                ):
                    return True
        return False

    def mode_effects(self, fn: Function) -> dict[str, str]:
        """The mode a local function leaves each model in (by model key), following its helpers.

        Memoised, and guarded against recursion in the analysed code (a helper that calls itself).
        """
        if fn in self._mode_effects:
            return self._mode_effects[fn]
        self._mode_effects[fn] = {}  # in progress: a recursive call sees no effect
        effects: dict[str, str] = {}
        for ev in self.fn_events(fn):
            if ev.kind in ("eval", "train") and ev.receiver:
                effects[model_key(ev.receiver)] = ev.kind
            elif ev.kind == "call" and isinstance(ev.node, ast.Call):
                effects.update(self.call_effects(ev.node))
        self._mode_effects[fn] = effects
        return effects

    def call_effects(self, call: ast.Call) -> dict[str, str]:
        """:meth:`mode_effects` of the functions a call reaches, with parameters renamed to the arguments."""
        out: dict[str, str] = {}
        for fn in self.local_functions(call):
            rename, _ = self.call_renames(call, fn)
            for key, mode in self.mode_effects(fn).items():
                out[rename.get(key, key)] = mode
        return out

    def call_renames(self, call: ast.Call, fn: Function) -> tuple[dict[str, str], list[str]]:
        """``{parameter: model key of its argument}`` for the named arguments of a call to ``fn``, and fn's
        parameters in order (``self`` dropped for a method call)."""
        params = [a.arg for a in fn.args.posonlyargs + fn.args.args]
        if params and params[0] in ("self", "cls") and isinstance(call.func, ast.Attribute):
            params = params[1:]
        rename = {
            p: model_key(text(a))
            for p, a in zip(params, self.positional_arguments(call))
            if isinstance(a, (ast.Name, ast.Attribute))
        }
        rename.update(
            {
                k.arg: model_key(text(k.value))
                for k in call.keywords
                if k.arg and isinstance(k.value, (ast.Name, ast.Attribute))
            }
        )
        return rename, params

    def positional_arguments(self, call: ast.Call) -> list[ast.expr]:
        """A call's positional arguments, ``*params`` expanded where ``params`` is bound to a tuple or list
        display earlier in the same function (pycls: ``params = (loader, model, ema, ...)``;
        ``train_epoch(*params, epoch)``); an argument it cannot expand ends the list."""
        out: list[ast.expr] = []
        for a in call.args:
            if not isinstance(a, ast.Starred):
                out.append(a)
                continue
            shown = self._display_bound(a.value, call) if isinstance(a.value, ast.Name) else None
            if shown is None:
                break
            out.extend(shown)
        return out

    def _display_bound(self, name: ast.Name, at: ast.AST) -> list[ast.expr] | None:
        scope = self.enclosing(at, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) or self.tree
        best: ast.Assign | None = None
        for node in walk(scope):
            if (
                isinstance(node, ast.Assign)
                and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id == name.id
                and (node.lineno, node.col_offset) < (name.lineno, name.col_offset)
                and (best is None or node.lineno > best.lineno)
            ):
                best = node
        if best is None or not isinstance(best.value, (ast.Tuple, ast.List)):
            return None
        if any(isinstance(e, ast.Starred) for e in best.value.elts):
            return None
        return list(best.value.elts)

    def under_no_grad(self, node: ast.AST) -> bool:
        p = self.parents.get(node)
        while p is not None:
            if isinstance(p, (ast.With, ast.AsyncWith)) and any(
                is_no_grad_ctx(i.context_expr) for i in p.items
            ):
                return True
            if isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef)):
                return any(is_no_grad_ctx(d, self) for d in p.decorator_list)
            p = self.parents.get(p)
        return False

    def in_lightning_module(self, fn: ast.AST) -> bool:
        cls = self.enclosing(fn, ast.ClassDef)
        return cls is not None and any("Lightning" in text(b) for b in cls.bases)

    MODULE_ONLY_METHODS = (
        "parameters",
        "named_parameters",
        "state_dict",
        "load_state_dict",
        "train",
        "eval",
        "modules",
        "named_modules",
        "children",
        "share_memory",
    )

    def builds_module(self, call: ast.Call) -> bool:
        """``self.network = config.network_fn()`` (possibly ``.to(device)``): a call whose result is bound to a
        name the file uses as a module (``.parameters()``, ``.state_dict()``, ``.train()``..., methods no tensor
        has) returns a module: construction, not a forward, whatever the callee is called."""
        users = self.__dict__.get("_module_users")
        if users is None:
            users = self._module_users = {
                m[0]
                for n in self.nodes
                if isinstance(n, ast.Call)
                and (m := method(n)) is not None
                and m[1] in self.MODULE_ONLY_METHODS
                and not (m[1] == "train" and n.args and not isinstance(n.args[0], ast.Constant))
            }
        node: ast.AST = call
        parent = self.parents.get(node)
        while (  # config.network_fn().to(device): the module moved, still the module
            isinstance(parent, ast.Attribute)
            and parent.attr in ("to", "cuda", "cpu", "half", "float", "double", "bfloat16")
            and isinstance(self.parents.get(parent), ast.Call)
        ):
            node = self.parents[parent]
            parent = self.parents.get(node)
        if isinstance(parent, (ast.Assign, ast.AnnAssign)) and parent.value is node:
            targets = parent.targets if isinstance(parent, ast.Assign) else [parent.target]
            return any(isinstance(t, (ast.Name, ast.Attribute)) and text(t) in users for t in targets)
        return False

    def segment(self, node: ast.AST) -> str | None:
        """:func:`ast.get_source_segment` over the file's lines, split once (it splits the whole file per call)."""
        lines = self.__dict__.get("_lines")
        if lines is None:  # the line ends ast uses: \r\n, \r, \n (not \f or \v)
            lines = self._lines = re.findall(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z", self.source)
        start, end = getattr(node, "lineno", None), getattr(node, "end_lineno", None)
        col, end_col = getattr(node, "col_offset", None), getattr(node, "end_col_offset", None)
        if start is None or end is None or col is None or end_col is None:
            return None
        if start == end:
            return lines[start - 1].encode()[col:end_col].decode()
        first = lines[start - 1].encode()[col:].decode()
        last = lines[end - 1].encode()[:end_col].decode()
        return "".join([first, *lines[start : end - 1], last])
