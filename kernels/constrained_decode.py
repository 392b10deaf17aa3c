"""Constrained greedy decoding step: argmax over a per-row allowed set of token ids.

The action grammar allows only a handful of tokens at each position (digits,
sign, separator, EOS: K <= 32). Computing the full ``(B, V)`` logits to mask
all but K of them reads the whole LM head (V x H, 1.2 GB for a 152k vocab at
H = 4096 in bf16) per decoded token. This module reads only the K gathered
rows of the LM head per batch row: ``B * K * H`` weights.

Triton path: grid ``(B, S)``. Program ``(b, s)`` gathers the rows
``W[allowed_ids[b]]`` over its slice of H, multiplies them with
``hidden[b]`` in fp32 and, when ``S == 1``, picks the winner in the same
program; when ``S > 1`` (small B: split H so enough SMs pull memory), it
writes fp32 partial logits and a second one-program-per-row kernel sums the
S partials in a fixed order and picks the winner. No atomics, so the result
is deterministic and two identical LM-head rows give bit-identical logits
(ties are exact and break to the smallest id).

Semantics (both paths): padding is -1 (any negative id is treated as
padding, wherever it sits in the row); NaN logits count as -inf; ties break
to the smallest id; a row with no allowed id, or an id >= V, is a
``ValueError`` raised before anything is launched.

This module must never compute or allocate V-wide logits, never copy the LM
head (no ``.contiguous()`` on it: both its strides go to the kernel), and
never change global torch/Triton settings.
"""
from __future__ import annotations

import functools

import torch

from ._backend import interpreting, resolve_backend, triton_available

__all__ = ["constrained_argmax", "constrained_argmax_reference", "MAX_ALLOWED"]

#: largest K (allowed ids per row) the Triton kernel takes; the grammar needs <= 32
MAX_ALLOWED = 128
_INT64_MAX = torch.iinfo(torch.int64).max


def _check_inputs(hidden, weight, allowed_ids, bias, validate: bool) -> torch.Tensor:
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"hidden must be (B, H) and lm_head_weight (V, H); got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    B, H = hidden.shape
    V = weight.shape[0]
    if weight.shape[1] != H:
        raise ValueError(f"lm_head_weight is {tuple(weight.shape)} but hidden size is {H}")
    if allowed_ids.dim() != 2 or allowed_ids.shape[0] != B or allowed_ids.shape[1] < 1:
        raise ValueError(f"allowed_ids must be (B={B}, K>=1), got {tuple(allowed_ids.shape)}")
    if allowed_ids.dtype.is_floating_point or allowed_ids.dtype == torch.bool:
        raise ValueError(f"allowed_ids must be an integer tensor, got {allowed_ids.dtype}")
    if bias is not None and tuple(bias.shape) != (V,):
        raise ValueError(f"bias is {tuple(bias.shape)}, expected ({V},)")
    allowed_ids = allowed_ids.long()
    if validate and B > 0:
        # One reduction, one host sync (none when the ids live on the CPU, the usual
        # case: the grammar runs on the host).
        flags = torch.stack([
            (allowed_ids < 0).all(dim=1).any(),
            (allowed_ids >= V).any(),
            (allowed_ids < -1).any(),
        ]).tolist()
        if flags[0]:
            rows = torch.nonzero((allowed_ids < 0).all(dim=1)).flatten().tolist()
            raise ValueError(f"constrained_argmax: rows {rows[:8]} have no allowed id (all -1)")
        if flags[1]:
            raise ValueError(f"constrained_argmax: allowed id >= vocabulary size {V}")
        if flags[2]:
            raise ValueError("constrained_argmax: allowed_ids may contain only ids >= 0 and -1 padding")
    return allowed_ids


# --------------------------------------------------------------------------- reference
def constrained_argmax_reference(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    allowed_ids: torch.Tensor,
    return_logits: bool = False,
    bias: torch.Tensor | None = None,
    *,
    validate: bool = True,
):
    """Gather ``W[allowed]`` -> ``(B, K, H)``, fp32 dot with ``hidden``, masked argmax.

    Same contract as :func:`constrained_argmax`; computes only ``B * K`` logits.
    """
    allowed_ids = _check_inputs(hidden, lm_head_weight, allowed_ids, bias, validate)
    allowed_ids = allowed_ids.to(hidden.device)
    B, K = allowed_ids.shape
    valid = allowed_ids >= 0
    safe = allowed_ids.clamp(min=0).reshape(-1)
    rows = lm_head_weight.index_select(0, safe).view(B, K, -1)
    logits = torch.bmm(rows.float(), hidden.float()[:, :, None])[:, :, 0]  # (B, K): one batched matrix product
    if bias is not None:
        logits = logits + bias.index_select(0, safe).view(B, K).float()
    logits = logits.masked_fill(~valid | torch.isnan(logits), float("-inf"))
    best = logits.max(dim=1, keepdim=True).values
    winners = torch.where(valid & (logits == best), allowed_ids,
                          torch.full_like(allowed_ids, _INT64_MAX))
    ids = winners.min(dim=1).values
    if return_logits:
        return ids, best.squeeze(1)
    return ids


# --------------------------------------------------------------------------- Triton
if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _select_and_store(logits, ids, valid, row, bias_ptr, stride_bias, out_id_ptr, out_logit_ptr,
                          HAS_BIAS: tl.constexpr):
        """Add the gathered bias, mask padding/NaN to -inf, argmax with smallest-id tie-break."""
        if HAS_BIAS:
            safe = tl.where(valid, ids, 0)
            logits += tl.load(bias_ptr + safe * stride_bias, mask=valid, other=0.0).to(tl.float32)
        logits = tl.where(valid & (logits == logits), logits, float("-inf"))
        best = tl.max(logits, axis=0)
        big = tl.full(ids.shape, 9223372036854775807, tl.int64)
        choice = tl.min(tl.where(valid & (logits == best), ids, big), axis=0)
        tl.store(out_id_ptr + row, choice)
        tl.store(out_logit_ptr + row, best)

    @triton.jit
    def _gather_logits_kernel(
        h_ptr, w_ptr, ids_ptr, part_ptr, bias_ptr, out_id_ptr, out_logit_ptr,
        H, K, H_PER_SPLIT,
        stride_hb, stride_wv, stride_wh, stride_ib, stride_bias,
        HAS_BIAS: tl.constexpr, FINALIZE: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        """Partial logits of row b over H-slice s: sum_h W[ids[b, k], h] * hidden[b, h]."""
        tl.static_assert((BLOCK_K & (BLOCK_K - 1)) == 0 and (BLOCK_H & (BLOCK_H - 1)) == 0,
                         "tl.arange sizes must be powers of two")
        row = tl.program_id(0)
        split = tl.program_id(1)
        num_splits = tl.num_programs(1)
        offs_k = tl.arange(0, BLOCK_K)
        ids = tl.load(ids_ptr + row * stride_ib + offs_k, mask=offs_k < K, other=-1)
        valid = ids >= 0
        w_rows = w_ptr + tl.where(valid, ids, 0)[:, None] * stride_wv  # ids are int64
        h_row = h_ptr + row.to(tl.int64) * stride_hb

        acc = tl.zeros((BLOCK_K, BLOCK_H), dtype=tl.float32)
        h_start = split * H_PER_SPLIT
        h_end = tl.minimum(h_start + H_PER_SPLIT, H)
        for h0 in range(h_start, h_end, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            h_ok = offs_h < h_end
            x = tl.load(h_row + offs_h, mask=h_ok, other=0.0).to(tl.float32)
            w = tl.load(w_rows + offs_h[None, :] * stride_wh,
                        mask=valid[:, None] & h_ok[None, :], other=0.0).to(tl.float32)
            acc += w * x[None, :]
        logits = tl.sum(acc, axis=1)

        if FINALIZE:
            _select_and_store(logits, ids, valid, row, bias_ptr, stride_bias,
                              out_id_ptr, out_logit_ptr, HAS_BIAS)
        else:
            tl.store(part_ptr + (row * num_splits + split) * BLOCK_K + offs_k, logits)

    @triton.jit
    def _select_kernel(
        part_ptr, ids_ptr, bias_ptr, out_id_ptr, out_logit_ptr,
        K, num_splits, stride_ib, stride_bias,
        HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """Sum the S partial logits of one row in a fixed order, then select."""
        row = tl.program_id(0)
        offs_k = tl.arange(0, BLOCK_K)
        ids = tl.load(ids_ptr + row * stride_ib + offs_k, mask=offs_k < K, other=-1)
        valid = ids >= 0
        logits = tl.zeros((BLOCK_K,), dtype=tl.float32)
        base = part_ptr + row * num_splits * BLOCK_K + offs_k
        for s in range(0, num_splits):
            logits += tl.load(base + s * BLOCK_K)
        _select_and_store(logits, ids, valid, row, bias_ptr, stride_bias,
                          out_id_ptr, out_logit_ptr, HAS_BIAS)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _launch(hidden, weight, allowed_ids, bias, num_splits: int | None, block_h: int | None = None):
    B, H = hidden.shape
    K = allowed_ids.shape[1]
    if K > MAX_ALLOWED:
        raise ValueError(f"constrained_argmax (triton): at most {MAX_ALLOWED} allowed ids per row, got {K}")
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    ids = allowed_ids.to(hidden.device, non_blocking=True)
    if ids.stride(-1) != 1:
        ids = ids.contiguous()
    out_ids = torch.empty(B, dtype=torch.int64, device=hidden.device)
    out_logits = torch.empty(B, dtype=torch.float32, device=hidden.device)
    if B == 0:
        return out_ids, out_logits
    BLOCK_K = max(16, triton.next_power_of_2(K))
    if block_h is None:
        block_h = 64 if interpreting() else max(64, 8192 // BLOCK_K)  # ~8K elements per tile
    BLOCK_H = int(block_h)
    if BLOCK_H < 1 or BLOCK_H & (BLOCK_H - 1):
        raise ValueError(f"block_h must be a power of two, got {BLOCK_H}")
    num_warps = 8 if BLOCK_K * BLOCK_H >= 8192 else 4
    n_chunks = triton.cdiv(H, BLOCK_H)
    if num_splits is None:
        # enough programs to keep ~2 per SM busy pulling rows from HBM
        num_splits = 1 if interpreting() else triton.cdiv(2 * _num_sms(hidden.device), B)
    num_splits = max(1, min(int(num_splits), n_chunks))
    h_per_split = triton.cdiv(n_chunks, num_splits) * BLOCK_H
    num_splits = triton.cdiv(H, h_per_split)
    finalize = num_splits == 1
    part = out_logits if finalize else torch.empty(
        (B, num_splits, BLOCK_K), dtype=torch.float32, device=hidden.device)
    b = bias if bias is not None else out_logits
    stride_bias = bias.stride(0) if bias is not None else 0
    _gather_logits_kernel[(B, num_splits)](
        hidden, weight, ids, part, b, out_ids, out_logits,
        H, K, h_per_split,
        hidden.stride(0), weight.stride(0), weight.stride(1), ids.stride(0), stride_bias,
        HAS_BIAS=bias is not None, FINALIZE=finalize,
        BLOCK_K=BLOCK_K, BLOCK_H=BLOCK_H, num_warps=num_warps,
    )
    if not finalize:
        _select_kernel[(B,)](
            part, ids, b, out_ids, out_logits,
            K, num_splits, ids.stride(0), stride_bias,
            HAS_BIAS=bias is not None, BLOCK_K=BLOCK_K, num_warps=1,
        )
    return out_ids, out_logits


# --------------------------------------------------------------------------- dispatcher
def constrained_argmax(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    allowed_ids: torch.Tensor,
    return_logits: bool = False,
    bias: torch.Tensor | None = None,
    *,
    backend: str | None = None,
    validate: bool = True,
    num_splits: int | None = None,
    block_h: int | None = None,
):
    """For each row b, the id in ``allowed_ids[b]`` with the largest logit.

    Args:
        hidden: ``(B, H)`` last hidden states (any float dtype).
        lm_head_weight: ``(V, H)``; any strides (it is never copied).
        allowed_ids: ``(B, K)`` integer ids, padded with -1. K > 128 runs the gathered-row
            reference whatever the backend (the kernel keeps one K tile per row). May live on
            the CPU: it is validated there without a device sync and copied to the device
            asynchronously.
        return_logits: also return the chosen logit, ``(B,)`` float32.
        bias: optional ``(V,)`` LM-head bias.
        backend: ``"auto"``/``"triton"``/``"torch"``; None reads ``VLA_SCALE_KERNELS``.
        validate: check for empty rows / out-of-range ids (one host sync when the ids
            are on the GPU). Disable only when the caller guarantees valid ids.
        num_splits: Triton path: number of H slices per row (None = auto).
        block_h: Triton path: H elements per tile (power of two; None = auto).

    Returns ``(B,)`` int64 ids, or ``(ids, logits)``. Logits accumulate in fp32;
    ties break to the smallest id. Raises ``ValueError`` for a row with no allowed id.
    """
    allowed_ids = _check_inputs(hidden, lm_head_weight, allowed_ids, bias, validate)
    # More than MAX_ALLOWED ids per row (the 256-bin baseline grammar): the kernel's one-tile-per-row
    # design does not take them, so the gathered-row reference runs, here rather than in every caller.
    if resolve_backend(backend, hidden, lm_head_weight, bias) == "torch" or allowed_ids.shape[1] > MAX_ALLOWED:
        return constrained_argmax_reference(hidden, lm_head_weight, allowed_ids, return_logits,
                                            bias, validate=False)
    ids, logits = _launch(hidden, lm_head_weight, allowed_ids, bias, num_splits, block_h)
    return (ids, logits) if return_logits else ids
