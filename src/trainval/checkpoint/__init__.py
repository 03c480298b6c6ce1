"""Checkpoints: what one holds, atomic writes, safe loads, and loading weights with clear errors.

A checkpoint is a plain dict that ``torch.load(path, weights_only=True)`` reads without trainval:
``"model"`` (the unwrapped model's state_dict) and ``"epoch"`` always; for resume also the optimizer,
scheduler, grad scaler, RNG states, the trainer's shuffling generator, step, best metric, callback
state and the history of epoch metrics. Only tensors and plain containers: nothing executes on load.

A sharded ``last.pt`` (FSDP, see :mod:`trainval.checkpoint.sharded`) holds ``"shards"`` instead of ``"model"`` and
``"optimizer"``: a pointer to the folder where every rank wrote its own part.
:func:`trainval.checkpoint.sharded.model_weights` gives the full model state_dict of either kind.

:class:`BackgroundWriter` runs at most one checkpoint write in a background thread (``async_save``),
and raises its error in the training thread.
"""

from __future__ import annotations

import copy
import os
import pickle
import threading
import zipfile
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from trainval import __version__
from trainval.errors import CheckpointError
from trainval.fsio import atomic_write
from trainval.state import TOP_K_FILE, top_k_name  # noqa: F401 - the names of the files below
from trainval.untrusted import open_regular, shown_names, shown_repr

# A test hook: called with the temp path after part of the bytes are written, before the file is
# complete. Fault-injection tests set it to pause or die right inside a write.
_write_hook: Callable[[str], None] | None = None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel) or type(model).__name__ == "DataParallel":
            model = cast(nn.Module, model.module)  # (DDP and DataParallel hold the user's module there)
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


class _HookedFile:
    """File wrapper that calls the test hook once half of the bytes are out (see ``_write_hook``)."""

    def __init__(self, f, hook):
        self._f, self._hook, self._written = f, hook, 0

    def write(self, b):
        n = self._f.write(b)
        self._written += len(b)
        if self._hook is not None and self._written > 0:
            hook, self._hook = self._hook, None
            self._f.flush()
            hook(self._f.name)
        return n

    def __getattr__(self, name):
        return getattr(self._f, name)


def save_checkpoint(state: dict, path: str, what: str = "checkpoint") -> None:
    """Atomically save ``state`` (tensors and plain containers only) to ``path``."""

    def write(f):
        torch.save(state, _HookedFile(f, _write_hook) if _write_hook else f)

    atomic_write(path, write, what)


# ----------------------------------------------------------------------------------------------
# Top-k checkpoints (save_top_k): their file names, and the files of a run that no last.pt keeps


def remove_top_k_files(folder: str, names: list[str] | set[str]) -> None:
    """Remove top-k files of ``folder`` by name (one that is gone already is fine); only names of the
    top-k form (:data:`TOP_K_FILE`), so nothing else can be named for removal."""
    for name in names:
        if TOP_K_FILE.fullmatch(name):
            try:
                os.remove(os.path.join(folder, name))
            except FileNotFoundError:
                pass


def stray_top_k_files(folder: str, kept: set[str]) -> list[str]:
    """Top-k files in ``folder`` that ``kept`` does not list: written after the last last.pt (its evaluation
    runs again on resume), dropped from the set before a crash cut their removal short, or a replaced run's."""
    try:
        entries = os.listdir(folder)
    except OSError:
        return []
    return sorted(
        e
        for e in entries
        if e not in kept
        and TOP_K_FILE.fullmatch(e)
        and os.path.isfile(os.path.join(folder, e))
        and not os.path.islink(os.path.join(folder, e))
    )


def load_checkpoint(path: str, map_location: Any = "cpu", follow: bool = True) -> dict:
    """Load a checkpoint with ``weights_only=True``; every failure is one clear :class:`CheckpointError`.

    Only a regular file is read: a FIFO, a device or a folder is refused before anything reads from it
    (``follow=False`` refuses a symbolic link too). The archive check and ``torch.load`` read the very
    file descriptor that was checked.
    """
    with open_regular(path, "checkpoint", CheckpointError, follow=follow) as f:
        check_archive(f, path)  # before torch.load inflates or allocates anything
        f.seek(0)
        state = _weights_only_load(f, path, map_location)
    if (
        isinstance(state, dict)
        and "model" not in state
        and all(isinstance(v, torch.Tensor) for v in state.values())
    ):
        state = {"model": state, "epoch": None}  # a bare state_dict saved by hand
    if not isinstance(state, dict) or ("model" not in state and not isinstance(state.get("shards"), dict)):
        raise CheckpointError(f"{path} is not a trainval checkpoint or state_dict (no 'model' entry).")
    return state


def _weights_only_load(f: Any, path: str, map_location: Any) -> Any:
    try:
        return torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        detail = next(
            (
                line.split("error:", 1)[1].strip()
                for line in text.splitlines()
                if "WeightsUnpickler error:" in line and line.split("error:", 1)[1].strip()
            ),
            "",
        )
        if "Unsupported global" in text or "GLOBAL" in text or "Unsupported class" in text:
            raise CheckpointError(
                f"refusing to load {path}: it holds Python objects other than tensors and plain containers, "
                "which could run code when unpickled. Only load checkpoints you trust, and re-save them as "
                "plain state_dicts."
            ) from None
        detail = detail or next(
            (ln.strip() for ln in text.splitlines()[1:] if ln.strip() and "Check the" not in ln), ""
        )
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is corrupt or not a PyTorch checkpoint"
            f"{f' ({detail})' if detail else ''}."
        ) from None
    except (
        RuntimeError,
        EOFError,
        zipfile.BadZipFile,
        ValueError,
        OSError,
        KeyError,
        IndexError,
        AttributeError,
        TypeError,
    ) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is truncated, corrupt or not a PyTorch checkpoint ({first})."
        ) from None


def check_archive(f: Any, path: str) -> None:
    """Refuse a file that no ``torch.save`` wrote, reading only the zip's central directory.

    ``f``: the checkpoint open for reading (a regular file, see :func:`load_checkpoint`); ``path``: its
    name in messages. ``torch.save`` writes a zip archive of *stored* (uncompressed) entries, so the
    entries' sizes add up to at most the file's size. A compressed entry, or sizes that claim more bytes
    than the file holds, is what a zip bomb looks like: refused before anything is inflated or allocated.
    """
    size = os.fstat(f.fileno()).st_size
    try:
        with zipfile.ZipFile(f) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is truncated, corrupt or not a PyTorch "
            f"checkpoint (not a zip archive as torch.save writes: {e or type(e).__name__})."
        ) from None
    compressed = [e.filename for e in entries if e.compress_type != zipfile.ZIP_STORED]
    if compressed:
        raise CheckpointError(
            f"refusing to load {path}: it holds compressed entries ({shown_names(compressed, 3)}), which "
            "torch.save never writes (a zip bomb?). Re-save it with torch.save."
        )
    declared = sum(e.file_size for e in entries)
    lying = [e.filename for e in entries if e.file_size != e.compress_size]
    if lying or declared > size:
        raise CheckpointError(
            f"refusing to load {path}: its entries claim {declared} bytes but the file holds "
            f"{size} (a zip bomb or a damaged file)."
        )


def load_model_weights(model: nn.Module, state_dict: dict, path: str = "checkpoint") -> None:
    """``load_state_dict(strict=True)``, with one error listing missing/unexpected keys and shape mismatches."""
    model = unwrap_model(model)
    state_dict = {_strip_prefixes(k): v for k, v in state_dict.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k}: checkpoint {list(v.shape)} vs model {list(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {shown_names(missing, 8)}")
        if unexpected:
            parts.append(f"unexpected keys: {shown_names(unexpected, 8)}")
        if shapes:
            parts.append(f"shape mismatches: {shown_names(shapes, 8)}")
        raise CheckpointError(
            f"{path} does not fit this model (a different architecture?): " + "; ".join(parts) + "."
        )
    model.load_state_dict(state_dict, strict=True)


def check_fits(own: dict[str, torch.Size], state: dict, path: str) -> None:
    """One clear error when ``state``'s keys or shapes differ from ``own`` (the model's full shapes)."""
    keys = {_strip_prefixes(k): v for k, v in state.items()}
    missing = [k for k in own if k not in keys]
    unexpected = [k for k in keys if k not in own]
    shapes = [
        f"{k}: checkpoint {list(v.shape)} vs model {list(own[k])}"
        for k, v in keys.items()
        if k in own and isinstance(v, torch.Tensor) and v.shape != own[k]
    ]
    if missing or unexpected or shapes:
        parts = [
            f"{what}: {shown_names(items, 8)}"
            for what, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", shapes),
            )
            if items
        ]
        raise CheckpointError(
            f"{path} does not fit this model (a different architecture?): " + "; ".join(parts) + "."
        )


def _strip_prefixes(key: str) -> str:
    # Checkpoints written by other tools may carry DDP's or torch.compile's wrapper prefixes.
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix) :]
    return key.replace("._orig_mod.", ".")


# Model keys that change no parameter name or shape (dropout only acts in training).
_NOT_ARCHITECTURE = frozenset({"dropout"})


def check_recorded_model(state: dict, model_cfg: dict, resolved: dict, path: str) -> None:
    """Refuse a checkpoint whose recorded model differs from the one the user's config builds.

    The recorded config is only compared, never used: a checkpoint is data and cannot choose what
    gets built or imported. A checkpoint without a recorded config (a bare state_dict) is checked by
    its keys and shapes alone when the weights are loaded.
    """
    recorded = found if isinstance(found := state.get("config"), dict) else {}
    differences = []
    saved_model = found if isinstance(found := recorded.get("model"), dict) else {}
    for key, value in model_cfg.items():
        if key in saved_model and key not in _NOT_ARCHITECTURE and saved_model[key] != value:
            differences.append(
                f"model.{key}: checkpoint {shown_repr(saved_model[key])}, config {shown_repr(value)}"
            )
    saved_resolved = found if isinstance(found := recorded.get("resolved"), dict) else {}
    for key, value in resolved.items():
        if key in saved_resolved and saved_resolved[key] != value:
            differences.append(
                f"{key}: checkpoint {shown_repr(saved_resolved[key])}, this config's data {shown_repr(value)}"
            )
    if differences:
        raise CheckpointError(
            f"{path} was trained with another model than this config builds ("
            + "; ".join(differences)
            + "); use the config the run was trained with."
        )


# ----------------------------------------------------------------------------------------------
# Background writes (async_save)


def snapshot(state: Any) -> Any:
    """A copy of ``state`` that later training steps cannot change: every tensor copied to the CPU.

    ``state_dict()`` tensors share memory with the live parameters and optimizer buffers, so a write in
    the background must not see them. Tensors that share memory keep sharing it in the copy (deepcopy).
    """
    memo: dict[int, Any] = {}

    def visit(obj: Any) -> None:  # GPU tensors: copied straight to the CPU (deepcopy would copy on the GPU)
        if isinstance(obj, torch.Tensor):
            if obj.device.type != "cpu":
                memo[id(obj)] = obj.detach().to("cpu")
        elif isinstance(obj, dict):
            for v in obj.values():
                visit(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v)

    visit(state)
    return copy.deepcopy(state, memo)


class BackgroundWriter:
    """At most one checkpoint write in flight; its error is raised in the training thread.

    ``run(write, path, background=True)`` waits for the previous write, then runs ``write`` in a thread
    of its own; ``wait()`` joins it and raises what it raised (a :class:`CheckpointError` naming the file).
    With ``background=False`` the write runs at once, in the caller's thread.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._path = ""

    def run(self, write: Callable[[], None], path: str, *, background: bool) -> None:
        self.wait()
        if not background:
            write()
            return

        def target() -> None:
            try:
                write()
            except BaseException as e:  # noqa: BLE001 - handed to the training thread by wait()
                self._error = e

        self._path = path
        self._thread = threading.Thread(target=target, name="trainval-checkpoint-write", daemon=True)
        self._thread.start()

    @property
    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        """Block until the write in flight is done; raise its error, if any (once)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is None:
            return
        if isinstance(error, CheckpointError):
            raise error
        raise CheckpointError(
            f"writing {self._path} in the background failed: {type(error).__name__}: {error}. "
            f"The previous {os.path.basename(self._path)}, if any, is intact."
        ) from error


def versions() -> dict:
    """The versions that wrote a checkpoint or a run folder's files."""
    return {"trainval": __version__, "torch": str(torch.__version__)}
