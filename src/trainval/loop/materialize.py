"""A model built on the meta device, given real tensors: whole (one process, DDP) or one shard per rank (FSDP).

Build the model under ``torch.device("meta")`` (no memory, no random draws) and hand it to the Trainer::

    torch.manual_seed(0)
    with torch.device("meta"):
        model = Net()
    Trainer(model, strategy=FSDPStrategy(), ...).fit(...)

The strategy gives it tensors on the training device: FSDP shards the meta model first, then allocates only
this rank's shard of each parameter. Values come from each module's own initialiser (``reset_parameters()``,
or the strategy's ``param_init(module)``), called module by module in ``model.modules()`` order on CPU tensors
of the module's full size, with the global CPU RNG as rank 0 has it when ``fit`` starts (broadcast, so every
rank draws the same numbers). The full-size tensors of one module live only while it is initialised; each rank
keeps its shard. For torch's layers (Linear, Conv, Embedding, the norms) and models that build them in the
order they register them (the CLI's MLP and CNN), that is the draw a plain build makes right after the same
seed: the model equals a plain build bit for bit. A module that re-initialises its children in its own
``__init__`` (``self.apply(init_weights)``) draws in another order; give that init as ``param_init``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import nn

from trainval import distributed
from trainval.errors import ConfigError

ParamInit = Callable[[nn.Module], None]


def on_meta(model: nn.Module) -> bool:
    """Does the model hold its tensors on the meta device? (Partly on it: one clear error.)"""
    tensors = list(itertools.chain(model.parameters(), model.buffers()))
    meta = sum(1 for t in tensors if t.is_meta)
    if 0 < meta < len(tensors):
        raise ConfigError(
            f"the model holds {meta} of its {len(tensors)} parameters and buffers on the meta device: build "
            'all of it under `with torch.device("meta"):` (trainval gives it real tensors), or none of it.'
        )
    return meta > 0


def check_initialisers(model: nn.Module, param_init: ParamInit | None) -> None:
    """Every module that holds tensors of its own can initialise them: one clear error before any work."""
    if param_init is not None:
        return
    for name, module in model.named_modules():
        if _own_tensors(module) and not callable(getattr(module, "reset_parameters", None)):
            raise ConfigError(
                f"module {name or '(the root)'!r} ({type(module).__name__}) was built on the meta device and "
                "holds parameters or buffers but has no reset_parameters() to initialise them: add one, pass "
                "the strategy a param_init(module) function, or build the model on a real device."
            )


def shared_rng_state() -> torch.Tensor:
    """The global CPU RNG state of rank 0 (every rank draws the same numbers from it)."""
    return distributed.broadcast_object(torch.get_rng_state())


@torch.no_grad()
def initialise(model: nn.Module, param_init: ParamInit | None, rng_state: torch.Tensor) -> None:
    """Fill the model's (allocated, uninitialised) tensors, one module at a time, from ``rng_state``.

    Each module's own parameters and buffers are swapped for CPU tensors of their full size while its
    initialiser runs; then each real tensor takes its part: the whole, or this rank's shard of a DTensor
    (the same rows a sharded full tensor would give this rank). The global RNG is left as it was.
    """
    init = param_init if param_init is not None else _reset_parameters
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(rng_state)
        for module in model.modules():
            own = _own_tensors(module)
            if not own:
                continue
            full = {key: _full_cpu(t) for key, t in own.items()}
            for (kind, name), t in full.items():
                getattr(module, kind)[name] = t
            try:
                init(module)
            finally:
                for (kind, name), t in own.items():
                    getattr(module, kind)[name] = t
            for key, t in own.items():
                _copy_part(t, full[key])


def _reset_parameters(module: nn.Module) -> None:
    module.reset_parameters()  # type: ignore[operator]  # checked by check_initialisers


def _own_tensors(module: nn.Module) -> dict[tuple[str, str], torch.Tensor]:
    """``{("_parameters"|"_buffers", name): tensor}``: the module's own (not its children's)."""
    own: dict[tuple[str, str], torch.Tensor] = {}
    for kind in ("_parameters", "_buffers"):
        for name, t in getattr(module, kind).items():
            if t is not None:
                own[(kind, name)] = t
    return own


def _full_cpu(t: torch.Tensor) -> torch.Tensor:
    """An uninitialised CPU tensor of ``t``'s full (unsharded) shape; a Parameter for a Parameter."""
    blank = torch.empty(t.shape, dtype=t.dtype, device="cpu")
    return nn.Parameter(blank, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else blank


def _copy_part(target: torch.Tensor, full: torch.Tensor) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor):
        # src_data_rank=None: every rank holds the same full tensor and keeps its own shard (no communication)
        part = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
        target.to_local().copy_(part.to_local())
    else:
        target.copy_(full)
