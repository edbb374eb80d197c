"""A denoiser call split into chunks (``max_model_batch``, or halved after running out of GPU memory) gives the
guiders the attention maps of every row, in row order, so S-CFG and concept guidance sample exactly as unsplit."""

from __future__ import annotations

import pytest
import torch

from diffprobe.guidance.concept import ConceptGuidance
from diffprobe.guidance.scfg import SCFG
from diffprobe.sampling import sample

PROMPTS = ["a red circle and a blue square", "two green triangles"]
SEEDS = [0, 1]
GUIDERS = {
    "scfg": lambda: SCFG(scale=5.0),
    "concept": lambda: ConceptGuidance(scale=5.0, concepts="a red circle; a blue square"),
}
STEPS = 2


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to the rounding of kernels that see another batch size (as in test_sampler_parity)."""
    return bool((a - b).abs().max() < 1e-3)


def run(adapter, name, **kwargs):
    return sample(adapter, GUIDERS[name](), PROMPTS, SEEDS, steps=STEPS, decode=False, **kwargs)


@pytest.fixture(scope="module")
def unsplit(tiny_sd):
    return {name: run(tiny_sd, name) for name in GUIDERS}


@pytest.mark.parametrize("max_model_batch", [1, 2, 3])
@pytest.mark.parametrize("name", list(GUIDERS))
def test_split_calls_match_the_unsplit_call(tiny_sd, unsplit, name, max_model_batch):
    split = run(tiny_sd, name, max_model_batch=max_model_batch)
    assert close(split.latents, unsplit[name].latents)
    assert len(split.records) == len(PROMPTS)
    assert [len(r["steps"]) for r in split.records] == [STEPS] * len(PROMPTS)


class OneOutOfMemory:
    """The adapter, except that its denoiser runs out of memory once: on the first call of more than two rows
    that comes after a call that succeeded (so a step's earlier chunk has already left its maps behind)."""

    def __init__(self, adapter):
        self._adapter = adapter
        self.calls: list[int] = []
        self.failed = False

    def __getattr__(self, name):
        return getattr(self._adapter, name)

    def predict(self, latents, t, cond):
        self.calls.append(len(latents))
        if not self.failed and len(self.calls) > 1 and len(latents) > 2:
            self.failed = True
            # a real OOM strikes inside the forward, after some layers (and their hooks) have run
            self._adapter.predict(latents[:1], t, cond.rows(0, 1))
            raise torch.OutOfMemoryError("simulated")
        return self._adapter.predict(latents, t, cond)


@pytest.mark.parametrize("name", ["scfg", "concept"])
def test_a_chunk_retried_after_out_of_memory_matches(tiny_sd, unsplit, name):
    adapter = OneOutOfMemory(tiny_sd)
    # scfg: 2 branches x 2 prompts = 4 rows; concept: 4 branches x 2 = 8 rows. Chunks of 3, then of 2.
    out = run(adapter, name, max_model_batch=3)
    # the first call of 3 rows after one that fitted fails
    expected = {"scfg": [3, 1, 3, 2, 2], "concept": [3, 3, 2, 2, 2, 2]}[name]
    assert adapter.failed and adapter.calls[: len(expected)] == expected
    assert close(out.latents, unsplit[name].latents)
