"""The guiders add no device-to-host synchronisation per sampling step.

On a GPU, a read of a device value on the host (``.item()``, ``.tolist()``, ``bool(tensor)``, ``nonzero``) stalls
the CPU until the GPU has caught up, so kernels stop queueing ahead; one such read per step is enough to make a
cheap guider expensive. These tests count the aten operations that force such a read while sampling, and require
the per-step count of S-CFG and concept guidance to equal that of plain CFG (host-side scheduler tables). The guiders
only touch the model's outputs, which live on the sampling device, so every read they added would be a stall there;
the counts do not depend on the device, so the property is checked on the CPU.
"""

from __future__ import annotations

import pytest

from diffprobe.guidance import CFG
from diffprobe.guidance.concept import ConceptGuidance
from diffprobe.guidance.scfg import SCFG
from diffprobe.sampling import sample
from diffprobe.sampling.ops import count_ops, dispatched, host_reads


def _reads(adapter, guider, steps: int) -> int:
    with count_ops() as ops:
        sample(adapter, guider, ["a red circle and a blue square", "two green triangles"], [0, 1], steps=steps)
    return host_reads(ops)


def test_the_counter_sees_operations_and_host_reads():
    import torch

    x = torch.ones(2)
    with count_ops() as ops:
        y = (x * 2).sum()
        bool(y > 1)
        y.item()
    assert ops["aten.mul.Tensor"] == 1 and ops["aten.sum.default"] == 1
    assert dispatched(ops) == 5  # mul, sum, gt, and the two reads
    assert host_reads(ops) == 2 and host_reads(ops, "cuda") == 0  # bool() and .item(), both of CPU values


@pytest.mark.parametrize(
    "guider",
    [SCFG(scale=5.0), ConceptGuidance(scale=5.0, concepts=["a red circle", "a blue square"])],
    ids=["scfg", "concept"],
)
def test_guiders_read_nothing_back_per_step(tiny_sd, guider):
    per_step_cfg = _reads(tiny_sd, CFG(5.0), 4) - _reads(tiny_sd, CFG(5.0), 2)
    per_step = _reads(tiny_sd, guider, 4) - _reads(tiny_sd, guider, 2)
    assert per_step == per_step_cfg, f"{guider.name} adds {(per_step - per_step_cfg) / 2:.1f} host reads per step"
