"""Find the places where a training step would wait for the accelerator, on any device, the CPU included.

A read of a tensor's value on the host (``.item()``, ``int(t)``, ``bool(t)``, ``.tolist()``) and an
operation whose output size depends on the data (a boolean-mask selection ``x[mask]``, ``nonzero``,
``masked_select``, ``unique``, ``repeat_interleave`` without ``output_size``) make the host wait until
the GPU has run everything queued before it, so the host can no longer launch work ahead of the GPU.
:func:`count_device_syncs` records every such operation with the line of Python that asked for it.
On a CPU nothing waits, but the same operations run, so the audit works without a GPU (where a GPU is
in use, operations on host tensors are left out: they wait for nothing)::

    with count_device_syncs() as syncs:
        loss = module.training_step(batch, 0)
        loss.backward()
    print(syncs.table())

Not seen: copies to the host (``.cpu()``) on a CPU run, where they do nothing; blocking copies from the
host to a GPU (each waits for the queued work; ``torch.cuda.set_sync_debug_mode`` sees them); and
synchronisations inside compiled extensions that bypass the dispatcher.
"""

from __future__ import annotations

import collections
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SyncReport", "count_device_syncs"]

_aten = torch.ops.aten
# operations that read a value back or whose output size depends on the data
_DATA_DEPENDENT = {
    _aten._local_scalar_dense.default: "value read on the host",
    _aten.nonzero.default: "nonzero",
    _aten.masked_select.default: "masked_select",
    _aten._unique2.default: "unique",
    _aten.unique_dim.default: "unique",
    _aten.unique_consecutive.default: "unique_consecutive",
    _aten.equal.default: "equal",
    _aten.allclose.default: "allclose",
    _aten.bincount.default: "bincount",
}
_INDEXING = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default, _aten._index_put_impl_.default}
_TORCH_DIR = str(Path(torch.__file__).resolve().parent)
_TORCH_OPTIM_DIR = str(Path(torch.__file__).resolve().parent / "optim")
_THIS_FILE = str(Path(__file__).resolve())
_PROJECT_DIR = Path(__file__).resolve().parents[1]


def _host_only(args: tuple, kwargs: dict) -> bool:
    """Whether, with an accelerator in use, the operation touches host tensors only (then it waits for nothing)."""
    if not torch.cuda.is_initialized():
        return False
    flat = [*args, *kwargs.values()]
    flat += [t for x in flat if isinstance(x, list | tuple) for t in x]
    return all(t.device.type == "cpu" for t in flat if isinstance(t, torch.Tensor))


def _reason(func: Any, args: tuple, kwargs: dict) -> str | None:
    if func in (_aten._to_copy.default, _aten.copy_.default):
        # a copy from an accelerator to the host waits for it (seen on a GPU run only)
        if func is _aten._to_copy.default:
            source, target = args[0].device, kwargs.get("device") or args[0].device
        else:
            target, source = args[0].device, args[1].device
        return "copy to the host" if source.type != "cpu" and torch.device(target).type == "cpu" else None
    if func in _DATA_DEPENDENT:
        return _DATA_DEPENDENT[func]
    if func in _INDEXING:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in indices):
            return "boolean-mask indexing"
        return None
    if func is _aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return "repeat_interleave without output_size"
    return None


def _site() -> str:
    """``file:line function`` of the innermost frame outside torch's internals and this module.

    ``torch.optim`` counts as a caller: its step reads are its own (on the host, for step counters kept
    there).
    """
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename).resolve()
        inside_torch = str(path).startswith(_TORCH_DIR) and not str(path).startswith(_TORCH_OPTIM_DIR)
        if str(path) == _THIS_FILE or inside_torch:
            continue
        if "site-packages" in path.parts:
            name = "/".join(path.parts[path.parts.index("site-packages") + 1 :])
        elif path.is_relative_to(_PROJECT_DIR):
            name = str(path.relative_to(_PROJECT_DIR))
        else:
            name = str(path)
        return f"{name}:{frame.lineno} {frame.name}"
    return "?"


class SyncReport:
    """The operations seen, counted by (reason, call site)."""

    def __init__(self) -> None:
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()

    def add(self, reason: str) -> None:
        self.counts[(reason, _site())] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def sites(self, prefix: str = "") -> dict[str, int]:
        """Call sites whose file path starts with ``prefix`` (e.g. ``"mmpo/"``), with their counts."""
        out: collections.Counter[str] = collections.Counter()
        for (_, site), n in self.counts.items():
            if site.startswith(prefix):
                out[site] += n
        return dict(out)

    def table(self) -> str:
        rows = sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0][1]))
        lines = [f"{n:>5}  {reason:<38} {site}" for (reason, site), n in rows]
        return "\n".join([f"{'count':>5}  {'operation':<38} call site", *lines, f"{self.total:>5}  in all"])


class _Mode(TorchDispatchMode):
    def __init__(self, report: SyncReport) -> None:
        super().__init__()
        self.report = report

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = _reason(func, args, kwargs)
        if reason is not None and not (reason != "copy to the host" and _host_only(args, kwargs)):
            self.report.add(reason)
        return func(*args, **kwargs)


@contextmanager
def count_device_syncs() -> Iterator[SyncReport]:
    """Count the operations in the block that would make the host wait for a GPU (see the module doc).

    Covers this thread and the autograd engine's work for CPU tensors (run on the calling thread).
    ``.tolist()`` and ``.numpy()`` are counted through a wrapper, since on a CPU they reach no operator.
    """
    report = SyncReport()
    names = ("tolist", "numpy")
    own = {name: torch.Tensor.__dict__[name] for name in names if name in torch.Tensor.__dict__}
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def wrap(name: str, original: Any) -> Any:
        def counted(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            report.add(f"{name}()")
            return original(self, *args, **kwargs)

        return counted

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        with _Mode(report):
            yield report
    finally:
        for name in names:
            if name in own:
                setattr(torch.Tensor, name, own[name])
            else:
                delattr(torch.Tensor, name)  # back to the inherited method
