"""The guiders add no device-to-host synchronisation per sampling step.

On a GPU, a read of a device value on the host (``.item()``, ``.tolist()``, ``bool(tensor)``, ``nonzero``) stalls
the CPU until the GPU has caught up, so kernels stop queueing ahead; one such read per step is enough to make a
cheap guider expensive. These tests count the aten operations that force such a read while sampling, and require
the per-step count of S-CFG and concept guidance to equal that of plain CFG (the scheduler's own reads). The counts
are device-independent, so the property is checked on the CPU.
"""

from __future__ import annotations

import collections

import pytest
from torch.utils._python_dispatch import TorchDispatchMode

from diffprobe.guidance import CFG
from diffprobe.guidance.concept import ConceptGuidance
from diffprobe.guidance.scfg import SCFG
from diffprobe.sampling import sample

HOST_READS = ("aten.item", "aten._local_scalar_dense", "aten.is_nonzero", "aten.nonzero", "aten.equal")


class _HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(HOST_READS):
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def _reads(adapter, guider, steps: int) -> int:
    with _HostReads() as mode:
        sample(adapter, guider, ["a red circle and a blue square", "two green triangles"], [0, 1], steps=steps)
    return sum(mode.counts.values())


def test_the_counter_sees_a_host_read(tiny_sd):
    import torch

    with _HostReads() as mode:
        torch.ones(2).sum().item()
    assert mode.counts["aten._local_scalar_dense.default"] == 1


@pytest.mark.parametrize(
    "guider",
    [SCFG(scale=5.0), ConceptGuidance(scale=5.0, concepts=["a red circle", "a blue square"])],
    ids=["scfg", "concept"],
)
def test_guiders_read_nothing_back_per_step(tiny_sd, guider):
    per_step_cfg = _reads(tiny_sd, CFG(5.0), 4) - _reads(tiny_sd, CFG(5.0), 2)
    per_step = _reads(tiny_sd, guider, 4) - _reads(tiny_sd, guider, 2)
    assert per_step == per_step_cfg, f"{guider.name} adds {(per_step - per_step_cfg) / 2:.1f} host reads per step"
