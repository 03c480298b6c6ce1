"""How the model is spread over processes: one process, DDP, or FSDP2 — behind one small interface.

The loop in :mod:`trainval.loop.trainer` never asks which strategy runs; it calls these methods:

=====================  =======================  ===========================  ==================================
                       :class:`SingleProcess`   :class:`DDPStrategy`          :class:`FSDPStrategy`
=====================  =======================  ===========================  ==================================
``wrap``               the model (compiled)     ``DistributedDataParallel``  ``fully_shard`` (in place), the
                                                (SyncBatchNorm optional)     optimizer pointed at the shards
``no_sync``            nothing                  ``model.no_sync()``          ``set_requires_gradient_sync``
``clip_grad_norm``     local norm               local norm (replicated)      norm over every shard
``model_state_dict``   ``state_dict()``         the module's                 gathered full, CPU, on rank 0
``all_finite``         local                    local (replicated)           every shard, all-reduced
eval forwards          local                    local (the plain module)      collectives (``forward_is_collective``):
                                                                             equally many on every rank
``sharded_checkpoint`` False: last.pt whole      False: last.pt whole         True: each rank writes its shards
a model on ``meta``    materialised whole       materialised whole, then     sharded on meta, then only this
                                                wrapped                      rank's shards materialised
=====================  =======================  ===========================  ==================================

A model built under ``torch.device("meta")`` is given real tensors by ``wrap`` (see
:mod:`trainval.loop.materialize`): the same values as a plain build after the same seed, and under FSDP no rank
ever holds more than its shards plus one module's full tensors.

``model_state_dict`` is always a plain, full ``state_dict`` of the unwrapped model (FQNs without
``module.``/``_orig_mod.``), so ``best.pt`` loads into a plain model with ``torch.load(weights_only=True)``.
Under FSDP it and ``optimizer_state_dict`` are collectives: every rank calls them, rank 0 gets the data.

``sharded_state_dict`` is this rank's part of the model and optimizer (DTensor shards under FSDP, full
tensors otherwise) for :mod:`trainval.checkpoint.sharded`; every strategy can load one (``load_sharded_state_dict``),
so a sharded last.pt resumes under any strategy and any number of processes. A whole last.pt (one
process, DDP) holds ``optimizer.state_dict()``, keyed by parameter index; FSDP renames it by parameter name
(:func:`optimizer_state_by_name`) before it takes its shards, so a whole last.pt resumes under FSDP too.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch import nn

from trainval import distributed
from trainval.checkpoint import _strip_prefixes, check_fits, load_model_weights, unwrap_model
from trainval.errors import ConfigError
from trainval.loop import materialize

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule

STRATEGIES = ("auto", "ddp", "fsdp")

Compile = Callable[[nn.Module], nn.Module]


class SingleProcess:
    """One process: the model as it is."""

    name = "single"
    sharded_checkpoint = False  # last.pt: one whole file from rank 0 (True: every rank writes its shards)
    param_init: materialize.ParamInit | None = None  # a meta model's initialiser (None: reset_parameters)

    def wrap(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, compile: Compile
    ) -> tuple[nn.Module, nn.Module]:
        """``(train_model, eval_model)``: the modules the steps call (a model on meta materialised first)."""
        self._materialize_whole(model, optimizer, device)
        net = compile(model)
        return net, net

    def _materialize_whole(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
    ) -> None:
        """A model on the meta device, given every tensor on ``device`` (the optimizer pointed at them)."""
        if not materialize.on_meta(model):
            return
        materialize.check_initialisers(model, self.param_init)
        names = {id(p): n for n, p in model.named_parameters()}
        rng_state = materialize.shared_rng_state()
        model.to_empty(device=device)  # new Parameter objects
        materialize.initialise(model, self.param_init, rng_state)
        _repoint_optimizer(optimizer, names, model)

    def no_sync(self, model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce of a non-final accumulation step (``sync=False``)."""
        return contextlib.nullcontext()

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def model_state_dict(self, model: nn.Module) -> dict:
        return unwrap_model(model).state_dict()

    def load_model_state_dict(self, model: nn.Module, state: dict, path: str) -> None:
        load_model_weights(model, state, path)

    def optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        return optimizer.state_dict()

    def load_optimizer_state_dict(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict
    ) -> None:
        optimizer.load_state_dict(state)

    def sharded_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """``{"model", "optimizer"}``: this rank's part, keyed by parameter name (DCP's state_dict API)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(unwrap_model(model), optimizer)
        return {"model": model_state, "optimizer": optimizer_state}

    def load_sharded_state_dict(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict
    ) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(
            unwrap_model(model),
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
        )

    def all_finite(self, model: nn.Module) -> bool:
        """Are all weights finite? One host read (a sync point, once per epoch)."""
        params = [p.detach() for p in model.parameters()]
        if not params:
            return True
        return bool(torch.stack([torch.isfinite(p).all() for p in params]).all())

    # Is an evaluation forward a collective? Then ranks with uneven evaluation shards must run equally many
    # forwards (the loop gives a rank that ran out stand-in forwards whose outputs it drops).
    forward_is_collective = False


class DDPStrategy(SingleProcess):
    """``DistributedDataParallel``: a full replica per rank, gradients all-reduced in backward.

    Args:
        sync_batchnorm: convert BatchNorm layers to ``SyncBatchNorm`` (statistics over every rank's batch;
            CUDA only, as torch's SyncBatchNorm).
    """

    name = "ddp"

    def __init__(self, sync_batchnorm: bool = False):
        self.sync_batchnorm = sync_batchnorm

    def wrap(self, model, optimizer, device, compile):
        if self.sync_batchnorm:
            if device.type != "cuda":
                raise ConfigError(
                    "sync_batchnorm needs CUDA devices (torch's SyncBatchNorm runs on GPUs only); "
                    "turn it off on the CPU."
                )
            _convert_sync_batchnorm(model)
        self._materialize_whole(model, optimizer, device)
        net = compile(model)
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(net, device_ids=ids), net

    def no_sync(self, model, sync):
        return contextlib.nullcontext() if sync else model.no_sync()


class FSDPStrategy(SingleProcess):
    """FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters, gradients and optimizer state sharded.

    Args:
        wrap_modules: which submodules become their own FSDP unit (parameters gathered just for their
            forward/backward): a tuple of module classes or a predicate; default: every element of an
            ``nn.ModuleList`` (a transformer's blocks). The root is always one unit.
        param_dtype, reduce_dtype: the ``MixedPrecisionPolicy`` (e.g. ``torch.bfloat16`` compute with
            ``torch.float32`` gradient reduction); default: the parameters' own dtype.
        cpu_offload: keep sharded parameters, gradients and optimizer state in CPU memory
            (``CPUOffloadPolicy``; the optimizer steps on the CPU).
        reshard_after_forward: free gathered parameters after forward (ZeRO-3, default) or keep them
            until backward (ZeRO-2-like: more memory, less communication).
        param_init: for a model built on the meta device, ``param_init(module)`` initialises each module's
            own parameters and buffers (given as full-size CPU tensors, one module at a time, in
            ``model.modules()`` order); default: the module's ``reset_parameters()``.

    A model built under ``torch.device("meta")`` is sharded while it holds no memory; then each rank
    allocates and initialises only its shards (see :mod:`trainval.loop.materialize`): no rank ever holds
    the whole model, and the model equals a plain build after the same seed.
    """

    name = "fsdp"
    sharded_checkpoint = True  # no rank ever holds the whole model or optimizer state for last.pt

    def __init__(
        self,
        wrap_modules: tuple[type, ...] | Callable[[nn.Module], bool] | None = None,
        *,
        param_dtype: torch.dtype | None = None,
        reduce_dtype: torch.dtype | None = None,
        cpu_offload: bool = False,
        reshard_after_forward: bool = True,
        param_init: materialize.ParamInit | None = None,
    ):
        self.wrap_modules, self.cpu_offload = wrap_modules, cpu_offload
        self.param_init = param_init
        self.param_dtype, self.reduce_dtype = param_dtype, reduce_dtype
        self.reshard_after_forward = reshard_after_forward

    def _is_unit(self, module: nn.Module, parent: nn.Module | None) -> bool:
        if self.wrap_modules is None:
            return isinstance(parent, nn.ModuleList)
        if isinstance(self.wrap_modules, tuple):
            return isinstance(module, self.wrap_modules)
        return bool(self.wrap_modules(module))

    def wrap(self, model, optimizer, device, compile):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        if self.cpu_offload and device.type == "cpu":
            raise ConfigError(
                "FSDP's cpu_offload moves GPU memory to the CPU; the model is on the CPU already: "
                "turn cpu_offload off, or train on CUDA."
            )
        _ensure_process_group(device)
        world = dist.get_world_size()
        meta = materialize.on_meta(model)
        if meta:  # nothing to broadcast: every rank draws the same numbers when its shards are materialised
            materialize.check_initialisers(model, self.param_init)
        # Every rank shards its own copy: start them all from rank 0's weights, as DDP does.
        elif world > 1:
            for t in model.state_dict().values():
                dist.broadcast(t, src=0)
        names = {id(p): n for n, p in model.named_parameters()}
        mesh = init_device_mesh(device.type, (world,))
        kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": self.reshard_after_forward}
        if self.param_dtype is not None or self.reduce_dtype is not None:
            kwargs["mp_policy"] = MixedPrecisionPolicy(
                param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype
            )
        if self.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        parents = {id(child): parent for parent in model.modules() for child in parent.children()}
        units = [m for m in model.modules() if m is not model and self._is_unit(m, parents.get(id(m)))]
        for unit in reversed(units):  # innermost first
            fully_shard(unit, **kwargs)
        fully_shard(model, **kwargs)
        if meta:  # only now memory: this rank's shards (and the buffers), then their values
            rng_state = materialize.shared_rng_state()
            model.to_empty(device="cpu" if self.cpu_offload else device)
            materialize.initialise(model, self.param_init, rng_state)
        # fully_shard replaced every parameter by a sharded one (a DTensor): point the optimizer at them,
        # by name. Its state is empty now (resume loads it after wrapping).
        _repoint_optimizer(optimizer, names, model)
        net = compile(model)
        return net, net

    def no_sync(self, model, sync):
        return _gradient_sync(cast("FSDPModule", unwrap_model(model)), sync)  # fully_shard made it one

    def clip_grad_norm(self, model, max_norm):
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)  # DTensor norms: over every shard

    def model_state_dict(self, model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(unwrap_model(model), options=options)  # a collective; full on rank 0

    def load_model_state_dict(self, model, state, path):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        module = unwrap_model(model)
        check_fits(_full_shapes(module), state, path)  # one clear error, as for a plain model
        state = {_strip_prefixes(k): v for k, v in state.items()}
        set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))

    def optimizer_state_dict(self, model, optimizer):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(unwrap_model(model), optimizer, options=options)

    def load_optimizer_state_dict(self, model, optimizer, state):
        """A full optimizer state: a whole last.pt's (one process or DDP: keyed by parameter index) is
        renamed by parameter name first, then every rank keeps its shard of each tensor."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        module = unwrap_model(model)
        by_name = optimizer_state_by_name(module, optimizer, state)
        set_optimizer_state_dict(module, optimizer, by_name, options=StateDictOptions(full_state_dict=True))

    def all_finite(self, model):
        local = [p.to_local().detach() if hasattr(p, "to_local") else p.detach() for p in model.parameters()]
        ok = torch.stack([torch.isfinite(t).all() for t in local]).all() if local else torch.tensor(True)
        return distributed.all_reduce_max(int(not bool(ok))) == 0  # one sync per epoch

    # Every forward gathers parameters with a collective: a rank with fewer evaluation batches
    # runs extra forwards (outputs discarded) so that no peer waits forever.
    forward_is_collective = True


def _repoint_optimizer(optimizer: torch.optim.Optimizer, names: dict[int, str], model: nn.Module) -> None:
    """The optimizer's parameters replaced by the model's new ones of the same name (``names``: the old
    parameters' ids and names)."""
    new = dict(model.named_parameters())
    for group in optimizer.param_groups:
        group["params"] = [new[names[id(p)]] if id(p) in names else p for p in group["params"]]


def optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """A full optimizer ``state_dict`` keyed by parameter name (FQN), from either keying.

    ``optimizer.state_dict()`` (what a whole last.pt holds, written by one process or DDP) keys each
    parameter's state by its index in the optimizer's groups; DCP's ``get/set_optimizer_state_dict`` with
    ``full_state_dict`` (FSDP) key it by the parameter's name in ``model`` (the unwrapped module). Indices map
    to names by position, group by group, as ``Optimizer.load_state_dict`` maps them to parameters; a state
    keyed by name already is returned as it is. Raises ``ValueError`` when the groups do not match.
    """
    groups = state.get("param_groups")
    if not isinstance(groups, list) or not isinstance(state.get("state"), dict):
        raise ValueError("it is not an optimizer state_dict (no state and param_groups)")
    if all(isinstance(p, str) for g in groups for p in g.get("params", [])):
        return state  # by name already (DCP's)
    names = {id(p): n for n, p in model.named_parameters()}
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(
            f"it has {len(groups)} parameter groups, this optimizer {len(optimizer.param_groups)}"
        )
    name_of: dict[Any, str] = {}
    for saved, group in zip(groups, optimizer.param_groups):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"a parameter group holds {len(saved['params'])} parameters, this optimizer's "
                f"{len(group['params'])}"
            )
        for index, param in zip(saved["params"], group["params"]):
            if id(param) not in names:
                raise ValueError("the optimizer holds a parameter that is not the model's")
            name_of[index] = names[id(param)]
    return {
        "state": {name_of[index]: value for index, value in state["state"].items()},
        "param_groups": [{**g, "params": [name_of[i] for i in g["params"]]} for g in groups],
    }


def _full_shapes(module: nn.Module) -> dict[str, torch.Size]:
    """The unsharded shape of every state_dict entry of an FSDP module (DTensors know theirs)."""
    return {k: v.shape for k, v in module.state_dict().items()}


def _convert_sync_batchnorm(model: nn.Module) -> None:
    # In place below the root; the converted layers keep the same Parameter objects, so the optimizer
    # still holds them.
    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        raise ConfigError("sync_batchnorm needs a model that holds BatchNorm layers, not a bare BatchNorm.")
    nn.SyncBatchNorm.convert_sync_batchnorm(model)


@contextlib.contextmanager
def _gradient_sync(model: FSDPModule, sync: bool) -> Iterator[None]:
    if sync:
        yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _ensure_process_group(device: torch.device) -> None:
    """FSDP needs a process group; on one process (no torchrun), a one-member group of our own."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        store=dist.HashStore(),
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=distributed.timeout_seconds()),
    )


def make_strategy(
    spec: str | SingleProcess, *, distributed_on: bool, sync_batchnorm: bool = False
) -> SingleProcess:
    """The strategy object for ``"auto"``/``"ddp"``/``"fsdp"`` (or one given as an object).

    ``"auto"``: DDP on several processes, the plain model on one. ``"ddp"`` on one process is the plain
    model too (nothing to synchronise).
    """
    if isinstance(spec, SingleProcess):
        return spec
    if spec not in STRATEGIES:
        raise ConfigError(
            f"strategy must be one of {', '.join(STRATEGIES)} (or a trainval.loop.strategies object), "
            f"got {spec!r}."
        )
    if spec == "fsdp":
        if sync_batchnorm:
            raise ConfigError("sync_batchnorm works with strategy 'ddp' (or 'auto'), not with 'fsdp'.")
        return FSDPStrategy()
    return DDPStrategy(sync_batchnorm) if distributed_on else SingleProcess()
