"""The sampler and attention capture."""

from .attention import attention_probs, capture_attention
from .loop import SampleResult, initial_latents, sample

__all__ = ["SampleResult", "attention_probs", "capture_attention", "initial_latents", "sample"]
