"""Fused channel-concat + linear + GELU: the first layer of the dual-encoder projector.

The VLA's image prefix is ``act(concat(z_frozen, z_train) @ W.T + b)``, where
``z_frozen`` comes from the frozen encoder (SigLIP, no gradient) and
``z_train`` from the trainable one (DINOv2). This module computes it without
ever materializing the ``(M, Df + Dt)`` concatenation:

* forward (Triton): one GEMM whose K loop runs in two phases, first the ``Df``
  columns of ``x_frozen`` against ``W[:, :Df]``, then the ``Dt`` columns of
  ``x_train`` against ``W[:, Df:]``, fp32 accumulation, bias and GELU (erf or
  tanh) fused into the epilogue, partial tiles masked;
* backward: ``g = grad_out * act'(pre)``, then cuBLAS GEMMs on the two weight
  column blocks (``grad_W[:, :Df] = g.T @ x_frozen`` and
  ``grad_W[:, Df:] = g.T @ x_train`` written straight into the two halves of
  one ``grad_W`` buffer, ``grad_x_train = g @ W[:, Df:]``). No gradient is
  computed for ``x_frozen`` unless it requires one (then
  ``g @ W[:, :Df]``, for generality: e.g. an unfrozen ablation).

Pre-activation: by default (``recompute=False``) the forward writes the
pre-activation ``(M, N)`` once, in the input dtype, and saves it for the
backward (the same tensor ``torch``'s ``linear -> gelu`` keeps alive). With
``recompute=True`` nothing of size ``(M, N)`` is saved: the backward re-runs
the forward GEMM with an epilogue that reads ``grad_out`` and writes ``g``
directly. That saves ``M * N * itemsize`` bytes of activation memory per call
(142.6 MB at the OpenVLA+ shape, bf16) for one extra GEMM of
``2 * M * N * (Df + Dt)`` FLOP. Either way the concatenation buffer
(``M * (Df + Dt) * itemsize``) is never allocated, and ``x_frozen``/``x_train``
are saved by reference (they are alive in the caller anyway).

Public entry points: :func:`fused_concat_linear` (dispatcher) and
:func:`fused_concat_linear_reference` (plain PyTorch, the ground truth).

This module must never allocate the concatenated input, never call
``.contiguous()`` on a tensor whose last dimension is already dense, and
never change global torch/Triton settings.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ._backend import ENV_VAR, interpreting, resolve_backend, triton_available

__all__ = ["fused_concat_linear", "fused_concat_linear_reference", "ACTIVATIONS", "AUTOTUNE_ENV", "IMPLS", "TUNE_ENV",
           "concat_linear_choices", "record_choice"]

#: set to "0" to use one fixed tile config instead of autotuning (tests: fewer compiles)
AUTOTUNE_ENV = "VLA_SCALE_KERNELS_AUTOTUNE"

#: activation name -> code used by the kernel (constexpr)
ACTIVATIONS = {None: 0, "gelu": 1, "gelu_tanh": 2}
_TORCH_APPROX = {1: "none", 2: "tanh"}


def _act_code(activation: str | None) -> int:
    if isinstance(activation, str):
        activation = activation.lower()
        if activation in ("none", "identity", "linear"):
            activation = None
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    return ACTIVATIONS[activation]


# --------------------------------------------------------------------------- reference
def fused_concat_linear_reference(
    x_frozen: torch.Tensor,
    x_train: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = "gelu",
) -> torch.Tensor:
    """``act(cat([x_frozen, x_train], -1) @ weight.T + bias)`` in plain PyTorch."""
    code = _act_code(activation)
    y = F.linear(torch.cat([x_frozen, x_train], dim=-1), weight, bias)
    if code == 0:
        return y
    return F.gelu(y, approximate=_TORCH_APPROX[code])


# --------------------------------------------------------------------------- Triton
MIN_DOT_TILE = 16  # wgmma/mma need >= 16 in every dot dimension; the interpreter does not check


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def check_block_config(meta: dict) -> None:
    """Static checks on one config: every dot tile >= 16 and every tl.arange a power of two."""
    for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        v = meta[name]
        if v < MIN_DOT_TILE or not _is_pow2(v):
            raise AssertionError(f"{name}={v}: tl.dot tiles must be powers of two >= {MIN_DOT_TILE}")
    if meta.get("GROUP_M", 1) < 1:
        raise AssertionError("GROUP_M must be >= 1")


if triton_available():
    import triton
    import triton.language as tl

    def _configs() -> list:
        if interpreting():
            # One small config: the interpreter's cost is per program and per launch.
            cfgs = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2},
                                  num_warps=4, num_stages=1)]
        else:
            # bf16/fp16 GEMM tiles. Every one was compiled and timed on an H200 at the OpenVLA+
            # shape (benchmarks/kernels.py --sections s): the 128x256 / 256x128 tiles with
            # 8 warps win there (500-516 TFLOP/s fwd); the smaller tiles are for small M or N.
            # fp32 configs that overflow shared memory are skipped by the autotuner, which
            # treats OutOfResources as infinitely slow.
            c = triton.Config
            cfgs = [
                c({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
                c({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
                c({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=8, num_stages=5),
                c({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
                c({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=8, num_stages=5),
                c({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
                c({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
                c({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
                c({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
            ]
        for cfg in cfgs:
            check_block_config(cfg.kwargs)
        return cfgs

    def _fixed_configs() -> list:
        """The single config used when autotuning is off (tests, quick runs)."""
        if interpreting():
            return _configs()
        cfg = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8},
                            num_warps=8, num_stages=3)
        check_block_config(cfg.kwargs)
        return [cfg]

    @triton.jit
    def _tanh(x):
        # tanh(x) = 2 * sigmoid(2x) - 1: saturates cleanly at +-1, and (unlike libdevice.tanh)
        # also runs under the interpreter. Absolute error ~1e-7 in fp32.
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0

    @triton.jit
    def _act_fwd(x, ACTIVATION: tl.constexpr):
        y = x
        if ACTIVATION == 1:  # exact GELU: x * Phi(x)
            y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
        elif ACTIVATION == 2:  # tanh approximation
            u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
            y = 0.5 * x * (1.0 + _tanh(u))
        return y

    @triton.jit
    def _act_grad(x, ACTIVATION: tl.constexpr):
        d = tl.full(x.shape, 1.0, tl.float32)
        if ACTIVATION == 1:  # Phi(x) + x * phi(x)
            cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
            pdf = 0.3989422804014327 * tl.exp(-0.5 * x * x)
            d = cdf + x * pdf
        elif ACTIVATION == 2:
            u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
            t = _tanh(u)
            du = 0.7978845608028654 * (1.0 + 0.134145 * x * x)
            d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
        return d

    @triton.jit
    def _concat_linear_kernel_impl(
        xf_ptr, xt_ptr, w_ptr, b_ptr, out_ptr, pre_ptr, gout_ptr,
        M, N, Df, Dt, M_BUCKET,
        stride_xf, stride_xt, stride_w, stride_o,
        HAS_BIAS: tl.constexpr,
        ACTIVATION: tl.constexpr,    # 0 none, 1 gelu (erf), 2 gelu (tanh)
        MODE: tl.constexpr,          # 0 out=act(z); 1 also pre=z; 2 out=gout*act'(z) (backward recompute)
        UPCAST: tl.constexpr,        # cast dot operands to fp32 (the interpreter's bf16 dot is wrong)
        DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32": only matters for fp32 operands
        EVEN_DF: tl.constexpr, EVEN_DT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        """z = [xf | xt] @ W.T + b for one (BLOCK_M, BLOCK_N) tile; last dims are unit-stride."""
        tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_K >= 16, "dot tiles must be >= 16")
        tl.static_assert((BLOCK_M & (BLOCK_M - 1)) == 0 and (BLOCK_N & (BLOCK_N - 1)) == 0
                         and (BLOCK_K & (BLOCK_K - 1)) == 0, "block sizes must be powers of two")

        # grouped ("super-tile") ordering so GROUP_M row-tiles reuse W tiles from L2
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        # Wrap rows/cols of partial tiles back into range: loads need no M/N mask, the
        # duplicated rows/cols are computed and then dropped by the masked store.
        rm = (offs_m % M).to(tl.int64)
        rn = (offs_n % N).to(tl.int64)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

        # phase 1: K = [0, Df) from x_frozen against W[:, :Df]
        a_ptrs = xf_ptr + rm[:, None] * stride_xf + offs_k[None, :]
        b_ptrs = w_ptr + rn[None, :] * stride_w + offs_k[:, None]
        for k0 in range(0, Df, BLOCK_K):
            if EVEN_DF:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                k_ok = offs_k < Df - k0
                a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K

        # phase 2: K = [Df, Df + Dt) from x_train against W[:, Df:]
        a_ptrs = xt_ptr + rm[:, None] * stride_xt + offs_k[None, :]
        b_ptrs = w_ptr + rn[None, :] * stride_w + Df + offs_k[:, None]
        for k0 in range(0, Dt, BLOCK_K):
            if EVEN_DT:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                k_ok = offs_k < Dt - k0
                a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K

        # epilogue: bias, activation (or its derivative), masked store
        if HAS_BIAS:
            bias = tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
            acc = acc + bias[None, :]
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        o_off = offs_m[:, None].to(tl.int64) * stride_o + offs_n[None, :]
        if MODE == 2:
            go = tl.load(gout_ptr + o_off, mask=mask, other=0.0).to(tl.float32)
            g = go * _act_grad(acc, ACTIVATION)
            tl.store(out_ptr + o_off, g.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            if MODE == 1:
                tl.store(pre_ptr + o_off, acc.to(pre_ptr.dtype.element_ty), mask=mask)
            y = _act_fwd(acc, ACTIVATION)
            tl.store(out_ptr + o_off, y.to(out_ptr.dtype.element_ty), mask=mask)


if triton_available():

    def _build(configs):
        # autotune -> heuristics -> jit; keyed on the GEMM dims (+ MODE: the backward-recompute
        # epilogue reads grad_out and may prefer other tiles). The autotuner also keys on dtypes.
        # M is keyed by its power-of-two bucket (M_BUCKET), so that inference with a new number of
        # tokens reuses the tuned config of its bucket instead of re-tuning for every length.
        return triton.autotune(configs=configs, key=["M_BUCKET", "N", "Df", "Dt", "MODE"])(
            triton.heuristics({
                "EVEN_DF": lambda a: a["Df"] % a["BLOCK_K"] == 0,
                "EVEN_DT": lambda a: a["Dt"] % a["BLOCK_K"] == 0,
            })(_concat_linear_kernel_impl))

    _concat_linear_kernel = _build(_configs())
    _concat_linear_kernel_fixed = _build(_fixed_configs())


def m_bucket(m: int) -> int:
    """The token-count bucket tuned configs and recorded choices are keyed by: the next power of two, >= 16."""
    return max(16, 1 << max(0, int(m) - 1).bit_length())


def _autotune_enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "1") not in ("0", "false", "False", "")


def _dense_last(x: torch.Tensor) -> torch.Tensor:
    """Make the last dimension unit-stride (a copy only when it is not)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch(xf, xt, w, b, act_code: int, mode: int, gout=None):
    """Run the Triton kernel on 2-D operands. Returns (out, pre) (pre is None unless mode == 1)."""
    M, Df = xf.shape
    Dt = xt.shape[1]
    N = w.shape[0]
    out = torch.empty((M, N), device=xt.device, dtype=xt.dtype)
    pre = torch.empty_like(out) if mode == 1 else None
    if M == 0 or N == 0:
        return out, pre
    if mode == 2:
        gout = gout.contiguous()
    upcast = interpreting() and xt.dtype == torch.bfloat16
    precision = "ieee"
    if xt.dtype == torch.float32 and xt.is_cuda and torch.backends.cuda.matmul.allow_tf32:
        precision = "tf32"  # follow torch's own setting for fp32 matmuls

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    kernel = _concat_linear_kernel if _autotune_enabled() else _concat_linear_kernel_fixed
    kernel[grid](
        xf, xt, w, b if b is not None else out, out,
        pre if pre is not None else out, gout if gout is not None else out,
        M, N, Df, Dt, m_bucket(M),
        xf.stride(0), xt.stride(0), w.stride(0), out.stride(0),
        HAS_BIAS=b is not None, ACTIVATION=act_code, MODE=mode,
        UPCAST=upcast, DOT_PRECISION=precision,
    )
    return out, pre


def _two_gemm_pre(xf, xt, w, b):
    """``[xf | xt] @ w.T + b`` as two BLAS GEMMs into one output: ``out = xf @ W_f^T (+ b)``, then
    ``out += xt @ W_t^T`` (beta = 1). The weight halves are strided views, never copied."""
    df = xf.shape[1]
    pre = torch.addmm(b, xf, w[:, :df].t()) if b is not None else torch.mm(xf, w[:, :df].t())
    return pre.addmm_(xt, w[:, df:].t())


def _two_gemm(xf, xt, w, b, act_code: int, store_pre: bool):
    """(out, pre or None) of the two-GEMM path; the activation runs in place when pre is not kept."""
    pre = _two_gemm_pre(xf, xt, w, b)
    if act_code == 0:
        return pre, None
    if store_pre:
        return F.gelu(pre, approximate=_TORCH_APPROX[act_code]), pre
    return torch.ops.aten.gelu_(pre, approximate=_TORCH_APPROX[act_code]), None


class _FusedConcatLinearFn(torch.autograd.Function):
    """autograd wrapper around a concat-free forward (the Triton kernel, or two GEMMs into one output);
    backward on the two weight column blocks, no GEMM for the frozen input's gradient."""

    @staticmethod
    def forward(ctx, x_frozen, x_train, weight, bias, act_code: int, recompute: bool, impl: str = "triton"):
        xf, xt, w = _dense_last(x_frozen), _dense_last(x_train), _dense_last(weight)
        b = bias.contiguous() if bias is not None else None
        store_pre = act_code != 0 and not recompute
        if impl == "two_gemm":
            out, pre = _two_gemm(xf, xt, w, b, act_code, store_pre)
        else:
            out, pre = _launch(xf, xt, w, b, act_code, mode=1 if store_pre else 0)
        ctx.save_for_backward(xf, xt, w, b, pre)
        ctx.act_code, ctx.impl = act_code, impl
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xf, xt, w, b, pre = ctx.saved_tensors
        act = ctx.act_code
        need_xf, need_xt, need_w, need_b = ctx.needs_input_grad[:4]
        grad_out = grad_out.to(xt.dtype)
        if act == 0:
            g = grad_out
        elif pre is None and ctx.impl == "two_gemm":  # recompute mode, BLAS path: the GEMMs again
            g = torch.ops.aten.gelu_backward(grad_out, _two_gemm_pre(xf, xt, w, b), approximate=_TORCH_APPROX[act])
        elif pre is None:  # recompute mode: re-run the GEMM, epilogue writes g = grad_out * act'(z)
            g, _ = _launch(xf, xt, w, b, act, mode=2, gout=grad_out)
        else:
            g = torch.ops.aten.gelu_backward(grad_out, pre, approximate=_TORCH_APPROX[act])
        Df = xf.shape[1]
        grad_xf = torch.mm(g, w[:, :Df]) if need_xf else None
        grad_xt = torch.mm(g, w[:, Df:]) if need_xt else None
        grad_w = None
        if need_w:
            grad_w = torch.empty_like(w)
            gt = g.t()
            torch.mm(gt, xf, out=grad_w[:, :Df])
            torch.mm(gt, xt, out=grad_w[:, Df:])
        grad_b = None
        if need_b:
            # column sums as a (1, M) @ (M, N) GEMM (fp32 accumulation in the BLAS): on CUDA,
            # g.sum(0) was measured to allocate an M x N temporary (142.6 MB at the OpenVLA+
            # shape), which raised the backward's peak memory above torch's own.
            grad_b = torch.mm(g.new_ones(1, g.shape[0]), g).view(-1).to(b.dtype)
        return grad_xf, grad_xt, grad_w, grad_b, None, None, None


# --------------------------------------------------------------------------- per-shape choice
#: implementations of the op: the Triton kernel, two BLAS GEMMs into one output, and torch's cat + linear
IMPLS = ("two_gemm", "triton", "cat")
#: set to "1" to time every implementation on the first CUDA call of a new shape and keep the fastest
TUNE_ENV = "VLA_SCALE_CONCAT_LINEAR_TUNE"
_CHOICES: dict[tuple, dict] = {}


def choice_key(xf: torch.Tensor, n: int, dt: int, activation_code: int, grad: bool) -> tuple:
    """What a recorded choice is keyed by: device, dtype, token-count bucket, the GEMM dims, activation, grad."""
    dev = torch.cuda.get_device_name(xf.device) if xf.is_cuda else xf.device.type
    return (dev, str(xf.dtype).replace("torch.", ""), m_bucket(xf.shape[0]), n, xf.shape[1], dt, activation_code, grad)


def concat_linear_choices() -> dict[str, dict]:
    """Every per-shape choice made in this process: key -> {"impl", "ms" (per impl, when measured), "how"}."""
    return {"/".join(map(str, k)): dict(v) for k, v in _CHOICES.items()}


def record_choice(key: tuple, impl: str, how: str = "set", ms: dict | None = None) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    _CHOICES[key] = {"impl": impl, "how": how, **({"ms": ms} if ms else {})}


def _run(impl: str, xf, xt, w, b, code: int, recompute: bool, grad: bool, activation):
    if impl == "cat":
        return fused_concat_linear_reference(xf, xt, w, b, activation)
    if grad:
        return _FusedConcatLinearFn.apply(xf, xt, w, b, code, bool(recompute), impl)
    xf, xt, w = _dense_last(xf), _dense_last(xt), _dense_last(w)
    b = b.contiguous() if b is not None else None
    if impl == "two_gemm":
        return _two_gemm(xf, xt, w, b, code, store_pre=False)[0]
    return _launch(xf, xt, w, b, code, mode=0)[0]


def _measure(key, xf, xt, w, b, code, recompute, grad, activation, repeats: int = 10) -> str:
    """Time each implementation on these very inputs (forward, plus backward when grad) and record the fastest."""
    ms = {}
    for impl in IMPLS:
        def once():
            out = _run(impl, xf, xt, w, b, code, recompute, grad, activation)
            if grad:
                out.backward(torch.ones_like(out))
        try:
            once()  # compile / autotune outside the timing
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                once()
            end.record()
            torch.cuda.synchronize()
            ms[impl] = start.elapsed_time(end) / repeats
        except Exception:  # e.g. out of shared memory for a dtype: that implementation is out
            continue
    if grad:
        for t in (xf, xt, w, b):
            if t is not None and t.grad is not None:
                t.grad = None
    best = min(ms, key=ms.get)
    record_choice(key, best, "measured", {k: round(v, 4) for k, v in ms.items()})
    return best


# --------------------------------------------------------------------------- dispatcher
def fused_concat_linear(
    x_frozen: torch.Tensor,
    x_train: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = "gelu",
    *,
    recompute: bool = False,
    backend: str | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    """``act(concat(x_frozen, x_train) @ weight.T + bias)`` without the concatenation.

    Args:
        x_frozen: ``(..., Df)`` features of the frozen encoder (normally no grad).
        x_train: ``(..., Dt)`` features of the trainable encoder, same leading dims.
        weight: ``(N, Df + Dt)``, as ``nn.Linear`` stores it.
        bias: ``(N,)`` or None.
        activation: ``"gelu"`` (erf), ``"gelu_tanh"`` or None.
        recompute: False saves the ``(M, N)`` pre-activation for the backward; True saves nothing of
            that size and recomputes it in the backward (not for ``impl="cat"``).
        backend: ``"auto"``/``"triton"``/``"torch"``; None reads ``VLA_SCALE_KERNELS``. ``"torch"`` (and
            auto off CUDA) is the PyTorch reference; ``"triton"`` named explicitly forces the Triton kernel.
        impl: on CUDA under auto, which implementation: ``"two_gemm"`` (the default: two cuBLAS GEMMs
            into one output, then bias and GELU; backward without the frozen input's GEMM), ``"triton"``
            (the fused kernel: opt in where measured faster) or ``"cat"`` (torch's cat + linear + gelu).
            None: the choice recorded for this shape (``record_choice``, or measured once per shape when
            ``VLA_SCALE_CONCAT_LINEAR_TUNE=1``), else ``"two_gemm"``. ``impl="two_gemm"`` also runs on CPU.

    Returns ``(..., N)`` in the compute dtype (the autocast dtype under autocast, else
    ``weight.dtype``). Gradients flow to ``x_train``, ``weight``, ``bias``, and to
    ``x_frozen`` only if it requires grad.
    """
    code = _act_code(activation)
    if x_frozen.dim() < 1 or x_train.dim() < 1 or weight.dim() != 2:
        raise ValueError("x_frozen and x_train need a feature dim; weight must be (N, Df + Dt)")
    if x_frozen.shape[:-1] != x_train.shape[:-1]:
        raise ValueError(f"leading dims differ: x_frozen {tuple(x_frozen.shape)} vs x_train {tuple(x_train.shape)}")
    Df, Dt = x_frozen.shape[-1], x_train.shape[-1]
    N = weight.shape[0]
    if weight.shape[1] != Df + Dt:
        raise ValueError(f"weight is {tuple(weight.shape)}, expected (N, {Df} + {Dt})")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias is {tuple(bias.shape)}, expected ({N},)")
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")

    forced_triton = (backend if backend is not None else os.environ.get(ENV_VAR, "auto")).strip().lower() == "triton"
    if impl == "triton":  # named explicitly: the kernel or a clear error, as backend="triton"
        resolve_backend("triton", x_frozen, x_train, weight, bias)
    elif impl == "cat" or (impl is None and resolve_backend(backend, x_frozen, x_train, weight, bias) == "torch"):
        return fused_concat_linear_reference(x_frozen, x_train, weight, bias, activation)

    dev = x_train.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
    lead = x_train.shape[:-1]
    xf = x_frozen.reshape(-1, Df).to(dtype)
    xt = x_train.reshape(-1, Dt).to(dtype)
    w = weight.to(dtype)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (xf, xt, w, bias))
    if impl is None:
        if forced_triton:
            impl = "triton"
        else:
            key = choice_key(xf, N, Dt, code, needs_grad)
            recorded = _CHOICES.get(key)
            if recorded is not None:
                impl = recorded["impl"]
            elif xf.is_cuda and os.environ.get(TUNE_ENV, "0") not in ("0", "", "false", "False"):
                with torch.enable_grad() if needs_grad else torch.no_grad():
                    impl = _measure(key, xf.detach().requires_grad_(xf.requires_grad),
                                    xt.detach().requires_grad_(xt.requires_grad), w.detach().requires_grad_(w.requires_grad),
                                    None if bias is None else bias.detach().requires_grad_(bias.requires_grad),
                                    code, recompute, needs_grad, activation)
            else:
                impl = "two_gemm"
                record_choice(key, impl, "default")
    out = _run(impl, xf, xt, w, bias, code, recompute, needs_grad, activation)
    return out.reshape(*lead, N)
