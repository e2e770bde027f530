"""Attention kernels for routed-KV (mixSGA) backbones.

``routed_attention`` reads each expert's compact K/V directly (Triton on CUDA, PyTorch reference elsewhere);
``routed_attention_reference`` is the expand-and-attend PyTorch oracle. Importing this package needs only torch.
"""

from .reference import routed_attention_reference
from .routed_attention import BACKEND_ENV_VAR, MAX_EXPERTS, resolve_backend, routed_attention, triton_available

__all__ = [
    "BACKEND_ENV_VAR",
    "MAX_EXPERTS",
    "resolve_backend",
    "routed_attention",
    "routed_attention_reference",
    "triton_available",
]
