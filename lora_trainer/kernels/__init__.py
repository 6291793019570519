"""Hot kernels with one signature and several backends: pure torch anywhere, and FLA,
causal-conv1d or flash-attn on CUDA when those packages are importable."""

from lora_trainer.kernels.attention import causal_attention
from lora_trainer.kernels.causal_conv1d import causal_conv1d
from lora_trainer.kernels.gated_delta_rule import chunk_gated_delta_rule

__all__ = ["causal_attention", "causal_conv1d", "chunk_gated_delta_rule"]
