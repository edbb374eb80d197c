"""The sampler and attention capture."""

from .attention import AttentionCapture, attention_probs, capture_attention
from .loop import SampleResult, initial_latents, sample

__all__ = ["AttentionCapture", "SampleResult", "attention_probs", "capture_attention", "initial_latents", "sample"]
