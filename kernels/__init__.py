"""Triton kernels of vla-scale, installed as ``vla_scale.kernels``.

Each op comes as a dispatcher (Triton on CUDA, the PyTorch reference
elsewhere; ``backend=`` or the ``VLA_SCALE_KERNELS`` environment variable
forces either) plus its ``*_reference``:

* :func:`fused_concat_linear` - ``act([x_frozen | x_train] @ W.T + b)`` without
  materializing the concatenation (dual-encoder projector, training).
* :func:`constrained_argmax` - argmax over per-row allowed token ids reading
  only the gathered LM-head rows (constrained action decoding).

This package must never be importable as a top-level ``kernels`` module
(transformers probes that name), and importing it must not require a GPU,
launch anything, or import triton when triton is absent.
"""
from ._backend import ENV_VAR, interpreting, resolve_backend, triton_available
from .concat_linear import ACTIVATIONS, fused_concat_linear, fused_concat_linear_reference
from .constrained_decode import MAX_ALLOWED, constrained_argmax, constrained_argmax_reference

__all__ = [
    "ACTIVATIONS",
    "ENV_VAR",
    "MAX_ALLOWED",
    "constrained_argmax",
    "constrained_argmax_reference",
    "fused_concat_linear",
    "fused_concat_linear_reference",
    "interpreting",
    "resolve_backend",
    "triton_available",
]
