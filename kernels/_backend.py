"""Backend selection shared by every kernel in ``vla_scale.kernels``.

Each public op has two implementations: a Triton kernel and a plain PyTorch
reference. This module decides which one runs:

* ``backend="auto"`` (the default): Triton when the tensors live on a CUDA
  device and ``triton`` imports, the PyTorch reference everywhere else.
* ``backend="triton"``: always the kernel. On a CPU tensor that only works
  under the Triton interpreter (``TRITON_INTERPRET=1`` set before
  ``triton`` is imported); otherwise a clear ``RuntimeError`` is raised.
* ``backend="torch"``: always the reference.

The per-call ``backend=`` argument wins over the environment variable
``VLA_SCALE_KERNELS`` (same three values), which wins over ``"auto"``.

This module must never import torch.cuda state at import time, launch work,
or change global Triton/torch settings; it only answers questions.
"""
from __future__ import annotations

import functools
import os

import torch

ENV_VAR = "VLA_SCALE_KERNELS"
_CHOICES = ("auto", "triton", "torch")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when ``import triton`` succeeds (it is Linux-only and optional)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def resolve_backend(backend: str | None, *tensors: torch.Tensor) -> str:
    """Return ``"triton"`` or ``"torch"`` for a call on ``tensors``."""
    choice = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    choice = choice.strip().lower()
    if choice not in _CHOICES:
        raise ValueError(
            f"kernel backend must be one of {_CHOICES}, got {choice!r} "
            f"(from {'the backend argument' if backend is not None else ENV_VAR})"
        )
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if choice == "auto":
        return "triton" if (on_cuda and triton_available()) else "torch"
    if choice == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' was requested but triton cannot be imported")
        if not on_cuda and not interpreting():
            raise RuntimeError(
                "backend='triton' on CPU tensors needs the Triton interpreter: set "
                "TRITON_INTERPRET=1 before triton is first imported"
            )
    return choice
