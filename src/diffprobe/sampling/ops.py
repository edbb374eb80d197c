"""Count the aten operations a block of code dispatches, and which of them read a device value on the host.

A host read (``.item()``, ``.tolist()``, ``bool(tensor)``, ``nonzero``) of a GPU value makes the CPU wait for the
GPU, so kernels stop queueing ahead; the number of dispatched operations bounds the launch cost of small kernels.
Reads are keyed by the device of the value read (``"aten.item.default@cuda"``), so a run can tell reads of the
sampling device's tensors from reads of host-side tables. Counts are the same on every device, so code that keeps
its values on the sampling device can be checked on a CPU: there every read is keyed ``@cpu``.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HOST_READS = ("aten.item", "aten._local_scalar_dense", "aten.is_nonzero", "aten.nonzero", "aten.equal")


class _Counter(TorchDispatchMode):
    def __init__(self, counts: collections.Counter[str]):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        self.counts[name] += 1
        if name.startswith(HOST_READS):
            device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
            self.counts[f"{name}@{device}"] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def count_ops() -> Iterator[collections.Counter[str]]:
    """``with count_ops() as ops: ...`` fills ``ops`` with aten operation name -> calls inside the block."""
    counts: collections.Counter[str] = collections.Counter()
    with _Counter(counts):
        yield counts


def dispatched(ops: collections.Counter[str]) -> int:
    """How many aten operations were counted."""
    return sum(n for name, n in ops.items() if "@" not in name)


def host_reads(ops: collections.Counter[str], device: str | torch.device = "cpu") -> int:
    """How many of the counted operations read a value held on ``device`` (a device type: cpu, cuda, ...)."""
    suffix = "@" + torch.device(device).type
    return sum(n for name, n in ops.items() if name.startswith(HOST_READS) and name.endswith(suffix))
