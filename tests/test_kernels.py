"""Tests of vla_scale.kernels: the Triton kernels against their PyTorch references.

On a CPU-only machine the kernels run under the Triton interpreter
(TRITON_INTERPRET=1, set below before anything imports triton). On a machine
with CUDA the same tests run the compiled kernels on the GPU, plus the
``gpu``-marked tests at production shapes.

These tests must never need a GPU to pass (CUDA-only tests skip without one), never
download anything, and never import the kernels folder as a top-level ``kernels``.
"""
import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# one fixed tile config: fewer compiles on GPU (the autotuned path has its own GPU test)
os.environ.setdefault("VLA_SCALE_KERNELS_AUTOTUNE", "0")

import pytest  # noqa: E402

from vla_scale import kernels as K  # noqa: E402
from vla_scale.kernels import (  # noqa: E402
    constrained_argmax,
    constrained_argmax_reference,
    fused_concat_linear,
    fused_concat_linear_reference,
)

pytestmark = pytest.mark.skipif(not K.triton_available(), reason="triton is not installed")

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

# relative Frobenius-norm tolerances against an fp32 reference on the same (rounded) inputs
FWD_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
BWD_TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACTS = ["gelu", "gelu_tanh", None]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values in the kernel output"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode()) % 10_000


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, gen, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(device=DEV, dtype=dtype)


def _concat_inputs(M, Df, Dt, N, dtype, bias, seed, lead=None):
    g = _gen(seed)
    shape = (lead if lead is not None else (M,))
    xf = _randn(*shape, Df, gen=g, dtype=dtype)
    xt = _randn(*shape, Dt, gen=g, dtype=dtype)
    w = _randn(N, Df + Dt, gen=g, dtype=dtype, scale=(Df + Dt) ** -0.5)
    b = _randn(N, gen=g, dtype=dtype) if bias else None
    return xf, xt, w, b


def _ref_fp32(xf, xt, w, b, act):
    return fused_concat_linear_reference(xf.float(), xt.float(), w.float(),
                                         None if b is None else b.float(), act)


# ------------------------------------------------------------------ fused_concat_linear forward
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_concat_linear_forward_matches_reference(dtype, act, bias):
    seed = _seed(str(dtype), act, bias)
    g = _gen(seed)
    # sizes that are not multiples of the blocks, Df != Dt, several tiles in M and N
    M = int(torch.randint(33, 80, (1,), generator=g))
    N = int(torch.randint(33, 72, (1,), generator=g))
    Df, Dt = [(24, 40), (40, 18), (17, 33)][seed % 3]
    xf, xt, w, b = _concat_inputs(M, Df, Dt, N, dtype, bias, seed)
    y = fused_concat_linear(xf, xt, w, b, act, backend="triton")
    assert y.shape == (M, N) and y.dtype == dtype and y.device.type == DEV
    assert rel_err(y, _ref_fp32(xf, xt, w, b, act)) < FWD_TOL[dtype]


def test_concat_linear_block_multiples_and_single_row():
    # K dims that are exact multiples of BLOCK_K (the unmasked EVEN_* loops), and M = 1
    for M, Df, Dt, N in [(64, 64, 32, 64), (1, 32, 48, 20)]:
        xf, xt, w, b = _concat_inputs(M, Df, Dt, N, torch.float16, True, seed=M + Df)
        y = fused_concat_linear(xf, xt, w, b, "gelu", backend="triton")
        assert rel_err(y, _ref_fp32(xf, xt, w, b, "gelu")) < FWD_TOL[torch.float16]


def test_concat_linear_leading_dims_and_strided_inputs():
    # (B, T, D) inputs; x_frozen a column slice of a wider buffer (row stride != D) and
    # x_train a transposed view (last-dim stride != 1, so the wrapper copies it)
    g = _gen(7)
    B, T, Df, Dt, N = 2, 13, 24, 40, 36
    wide = _randn(B, T, Df + 8, gen=g)
    xf = wide[..., 4:4 + Df]
    xt = _randn(B, Dt, T, gen=g).transpose(1, 2)
    w = _randn(N, Df + Dt, gen=g, scale=0.15)
    b = _randn(N, gen=g)
    y = fused_concat_linear(xf, xt, w, b, "gelu_tanh", backend="triton")
    assert y.shape == (B, T, N)
    assert rel_err(y, fused_concat_linear_reference(xf, xt, w, b, "gelu_tanh")) < 1e-5


def test_concat_linear_never_materializes_the_concat(monkeypatch):
    def no_cat(*a, **k):
        raise AssertionError("torch.cat was called on the kernel path")

    xf, xt, w, b = _concat_inputs(20, 24, 40, 36, torch.float32, True, seed=3)
    xt.requires_grad_(True)
    w.requires_grad_(True)
    monkeypatch.setattr(torch, "cat", no_cat)
    y = fused_concat_linear(xf, xt, w, b, "gelu", backend="triton")
    y.sum().backward()
    assert xt.grad is not None and w.grad is not None


# ------------------------------------------------------------------ fused_concat_linear backward
BWD_CASES = [(d, a, r) for d in DTYPES for a in ACTS for r in ([False, True] if a else [False])]


@pytest.mark.parametrize("dtype,act,recompute", BWD_CASES,
                         ids=[f"{str(d)[6:]}-{a}-{'recompute' if r else 'store'}" for d, a, r in BWD_CASES])
def test_concat_linear_backward_matches_autograd(dtype, act, recompute):
    seed = _seed(str(dtype), act, recompute)
    M, Df, Dt, N = 45, 24, 40, 37
    xf, xt, w, b = _concat_inputs(M, Df, Dt, N, dtype, True, seed)
    xt.requires_grad_(True)
    w.requires_grad_(True)
    b.requires_grad_(True)
    y = fused_concat_linear(xf, xt, w, b, act, backend="triton", recompute=recompute)
    go = _randn(M, N, gen=_gen(seed + 1), dtype=dtype)
    y.backward(go)
    assert xf.grad is None and not xf.requires_grad

    xt32, w32, b32 = (t.detach().float().requires_grad_(True) for t in (xt, w, b))
    fused_concat_linear_reference(xf.float(), xt32, w32, b32, act).backward(go.float())
    for name, got, want in [("x_train", xt.grad, xt32.grad), ("weight", w.grad, w32.grad),
                            ("bias", b.grad, b32.grad)]:
        assert got.dtype == dtype and got.shape == want.shape, name
        err = rel_err(got, want)
        assert err < BWD_TOL[dtype], f"grad {name}: rel err {err:.2e}"


def test_concat_linear_x_frozen_grad_when_it_requires_grad():
    xf, xt, w, b = _concat_inputs(30, 24, 40, 20, torch.float32, False, seed=11)
    for t in (xf, xt, w):
        t.requires_grad_(True)
    fused_concat_linear(xf, xt, w, None, "gelu", backend="triton").square().sum().backward()
    ref = [t.detach().clone().requires_grad_(True) for t in (xf, xt, w)]
    fused_concat_linear_reference(*ref, None, "gelu").square().sum().backward()
    for got, want in zip((xf, xt, w), ref):
        assert rel_err(got.grad, want.grad) < 1e-5


def test_concat_linear_only_weight_requires_grad_and_no_grad_mode():
    xf, xt, w, b = _concat_inputs(19, 24, 40, 20, torch.float32, True, seed=12)
    w.requires_grad_(True)
    y = fused_concat_linear(xf, xt, w, b, "gelu", backend="triton")
    y.sum().backward()
    w_ref = w.detach().clone().requires_grad_(True)
    fused_concat_linear_reference(xf, xt, w_ref, b, "gelu").sum().backward()
    assert rel_err(w.grad, w_ref.grad) < 1e-5 and xt.grad is None
    with torch.no_grad():
        y2 = fused_concat_linear(xf, xt, w, b, "gelu", backend="triton")
    assert not y2.requires_grad and torch.allclose(y2, y.detach())


def test_concat_linear_autocast_casts_like_linear():
    xf, xt, w, b = _concat_inputs(19, 24, 40, 20, torch.float32, True, seed=13)
    w.requires_grad_(True)
    amp = torch.float16 if CUDA else torch.bfloat16
    with torch.autocast(DEV, dtype=amp):
        y = fused_concat_linear(xf, xt, w, b, "gelu", backend="triton")
    assert y.dtype == amp
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32
    assert rel_err(y, fused_concat_linear_reference(xf, xt, w, b, "gelu")) < 2e-2


# ------------------------------------------------------------------ dispatch, config, errors
def test_dispatch_backend_selection(monkeypatch):
    xf, xt, w, b = _concat_inputs(5, 8, 8, 4, torch.float32, True, seed=1)
    calls = []
    real = K.concat_linear.fused_concat_linear_reference
    monkeypatch.setattr(K.concat_linear, "fused_concat_linear_reference",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    fused_concat_linear(xf.cpu(), xt.cpu(), w.cpu(), b.cpu())  # auto on CPU -> reference
    assert calls == [1]
    fused_concat_linear(xf, xt, w, b, backend="torch")
    assert calls == [1, 1]
    monkeypatch.setenv(K.ENV_VAR, "torch")
    fused_concat_linear(xf, xt, w, b)
    assert calls == [1, 1, 1]
    monkeypatch.setenv(K.ENV_VAR, "triton")
    fused_concat_linear(xf, xt, w, b)  # env forces the kernel
    assert calls == [1, 1, 1]
    assert K.resolve_backend("torch", xf) == "torch"  # the argument beats the env
    monkeypatch.setenv(K.ENV_VAR, "cuda-please")
    with pytest.raises(ValueError):
        fused_concat_linear(xf, xt, w, b)
    monkeypatch.delenv(K.ENV_VAR)
    if CUDA:
        assert K.resolve_backend(None, xf) == "triton"
    else:  # without the interpreter, asking for triton on CPU is a clear error
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            K.resolve_backend("triton", xf)


def test_block_configs_are_valid_for_gpus():
    cl = K.concat_linear
    configs = cl._concat_linear_kernel.configs + cl._concat_linear_kernel_fixed.configs
    assert configs
    for cfg in configs:
        cl.check_block_config(cfg.kwargs)  # >= 16 and powers of two
    for bad in ({"BLOCK_M": 8, "BLOCK_N": 32, "BLOCK_K": 32}, {"BLOCK_M": 32, "BLOCK_N": 48, "BLOCK_K": 32}):
        with pytest.raises(AssertionError):
            cl.check_block_config(bad)


def test_concat_linear_shape_errors():
    xf, xt, w, b = _concat_inputs(5, 8, 8, 4, torch.float32, True, seed=1)
    with pytest.raises(ValueError):
        fused_concat_linear(xf, xt[:4], w, b, backend="triton")
    with pytest.raises(ValueError):
        fused_concat_linear(xf, xt, w[:, :15], b, backend="triton")
    with pytest.raises(ValueError):
        fused_concat_linear(xf, xt, w, b[:3], backend="triton")
    with pytest.raises(ValueError):
        fused_concat_linear(xf, xt, w, b, activation="relu", backend="triton")


# ------------------------------------------------------------------ constrained_argmax
def _allowed(B, K, V, gen, min_valid=1):
    """Per-row different allowed sets (distinct ids), -1 padding after the valid ones."""
    ids = torch.full((B, K), -1, dtype=torch.int64)
    for r in range(B):
        n = int(torch.randint(min_valid, K + 1, (1,), generator=gen))
        ids[r, :n] = torch.randperm(V, generator=gen)[:n]
    return ids


def _check_argmax(hidden, W, ids, bias, got_ids, got_logits, atol):
    ref_ids, ref_logits = constrained_argmax_reference(hidden, W, ids, True, bias)
    assert got_ids.dtype == torch.int64 and got_logits.dtype == torch.float32
    assert torch.allclose(got_logits.cpu(), ref_logits.cpu(), atol=atol, rtol=atol)
    # ids equal except where two allowed logits are within rounding of each other
    differ = (got_ids.cpu() != ref_ids.cpu()).nonzero().flatten()
    for r in differ.tolist():
        rows = W.index_select(0, got_ids[r:r + 1].to(W.device)).float()
        logit = rows[0] @ hidden[r].float() + (0 if bias is None else bias[got_ids[r]].float())
        assert abs(logit.item() - ref_logits[r].item()) <= atol, f"row {r}: wrong id"
        assert int(got_ids[r]) in ids[r].tolist()


@pytest.mark.parametrize("K_", [1, 2, 5, 12, 16, 17, 32])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_constrained_argmax_matches_reference(K_, dtype):
    g = _gen(K_ * 31 + DTYPES.index(dtype))
    B, V, H = 6, 300, 72
    W = _randn(V, H, gen=g, dtype=dtype)
    hidden = _randn(B, H, gen=g, dtype=dtype)
    ids = _allowed(B, K_, V, g).to(DEV)
    bias = _randn(V, gen=g, dtype=dtype) if K_ % 2 else None
    got_ids, got_logits = constrained_argmax(hidden, W, ids, True, bias, backend="triton")
    assert got_ids.shape == (B,) and got_ids.device.type == DEV
    _check_argmax(hidden, W, ids, bias, got_ids, got_logits, atol=1e-3)
    for r in range(B):  # the winner is always one of the row's allowed ids
        assert int(got_ids[r]) in [i for i in ids[r].tolist() if i >= 0]
    only_ids = constrained_argmax(hidden, W, ids, bias=bias, backend="triton")
    assert torch.equal(only_ids, got_ids)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_constrained_argmax_ties_break_to_smallest_id(num_splits):
    g = _gen(5)
    V, H = 64, 200
    W = _randn(V, H, gen=g, dtype=torch.float16, scale=0.1)
    hidden = _randn(3, H, gen=g, dtype=torch.float16)
    # rows 9, 23, 41 are identical and aligned with hidden[0]: their logits tie exactly
    for i in (9, 23, 41):
        W[i] = hidden[0] * 0.5
    W[50] = hidden[1] * 0.5
    W[7] = hidden[1] * 0.5  # row 1: tie between 50 and 7
    ids = torch.tensor([[41, 3, 23, 9, 5, -1, -1, -1],   # winner 9, listed after 41 and 23
                        [50, 2, 7, -1, -1, -1, -1, -1],   # winner 7, listed after 50
                        [23, 41, -1, -1, -1, -1, -1, -1]],  # only tied rows: 23
                       device=DEV)
    hidden[2] = hidden[0]
    for backend in ("triton", "torch"):
        got = constrained_argmax(hidden, W, ids, backend=backend, num_splits=num_splits)
        assert got.tolist() == [9, 7, 23], backend


def test_constrained_argmax_split_h_matches_single():
    g = _gen(6)
    V, H, B = 128, 300, 4
    W = _randn(V, H, gen=g, dtype=torch.float32)
    hidden = _randn(B, H, gen=g)
    ids = _allowed(B, 12, V, g).to(DEV)
    bias = _randn(V, gen=g)
    one = constrained_argmax(hidden, W, ids, True, bias, backend="triton", num_splits=1)
    three = constrained_argmax(hidden, W, ids, True, bias, backend="triton", num_splits=3)
    assert torch.equal(one[0], three[0])
    assert torch.allclose(one[1], three[1], atol=1e-4)
    _check_argmax(hidden, W, ids, bias, *three, atol=1e-4)


def test_constrained_argmax_empty_row_and_bad_ids_raise():
    W = torch.randn(10, 16, device=DEV)
    h = torch.randn(2, 16, device=DEV)
    for backend in ("triton", "torch"):
        with pytest.raises(ValueError, match="no allowed id"):
            constrained_argmax(h, W, torch.tensor([[1, 2], [-1, -1]], device=DEV), backend=backend)
        with pytest.raises(ValueError, match="vocabulary"):
            constrained_argmax(h, W, torch.tensor([[1, 10], [0, -1]], device=DEV), backend=backend)
        with pytest.raises(ValueError):
            constrained_argmax(h, W, torch.tensor([[1, -2], [0, -1]], device=DEV), backend=backend)
        with pytest.raises(ValueError):
            constrained_argmax(h, W, torch.tensor([[1.0, 2.0], [0.0, 1.0]], device=DEV), backend=backend)


def test_constrained_argmax_nan_logits_are_minus_inf():
    W = torch.randn(10, 16, device=DEV)
    W[4] = float("nan")
    h = torch.randn(1, 16, device=DEV)
    ids = torch.tensor([[4, 6, 2]], device=DEV)
    want = constrained_argmax_reference(h, W, ids)
    assert int(want) in (6, 2)
    assert torch.equal(constrained_argmax(h, W, ids, backend="triton"), want)


def test_constrained_argmax_ids_on_host_hidden_on_device():
    g = _gen(8)
    W = _randn(50, 32, gen=g)
    h = _randn(3, 32, gen=g)
    ids_host = _allowed(3, 5, 50, g)  # the grammar builds ids on the CPU
    got = constrained_argmax(h, W, ids_host, backend="triton")
    assert got.device.type == DEV
    assert torch.equal(got.cpu(), constrained_argmax_reference(h, W, ids_host.to(DEV)).cpu())


def test_constrained_argmax_never_builds_v_wide_logits():
    # A 2**40-row LM head as an expanded view (stride 0 over V): V-wide logits would be
    # 4 TiB per row and a copy of the head 64 TiB, so this only passes if both paths read
    # just the gathered rows. All rows are equal, so every logit ties: smallest id wins.
    V, H = 2 ** 40, 16
    W = torch.randn(1, H, device=DEV).expand(V, H)
    h = torch.randn(2, H, device=DEV)
    ids = torch.tensor([[V - 1, 12345678901, 3, -1], [V - 2, V - 3, -1, -1]], device=DEV)
    for backend in ("triton", "torch"):
        got = constrained_argmax(h, W, ids, backend=backend)
        assert got.tolist() == [3, V - 3], backend


# ------------------------------------------------------------------ GPU only: production shapes
@gpu
@needs_cuda
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("impl", ["two_gemm", "triton"])
def test_gpu_concat_linear_openvla_shape_bf16(monkeypatch, recompute, impl):
    monkeypatch.setenv("VLA_SCALE_KERNELS_AUTOTUNE", "1")  # the autotuned kernel
    M, Df, Dt, N = 32 * 256, 1152, 1024, 8704
    xf, xt, w, b = _concat_inputs(M, Df, Dt, N, torch.bfloat16, True, seed=21)
    for t in (xt, w, b):
        t.requires_grad_(True)
    y = fused_concat_linear(xf.view(32, 256, Df), xt.view(32, 256, Dt), w, b, "gelu",
                            recompute=recompute, impl=impl)
    assert y.shape == (32, 256, N)
    go = _randn(32, 256, N, gen=_gen(22), dtype=torch.bfloat16)
    y.backward(go)
    assert xf.grad is None
    xt32, w32, b32 = (t.detach().float().requires_grad_(True) for t in (xt, w, b))
    y_ref = fused_concat_linear_reference(xf.float(), xt32, w32, b32, "gelu")
    y_ref.backward(go.float().view(M, N))
    assert rel_err(y.view(M, N), y_ref) < 1e-2
    for got, want in [(xt.grad, xt32.grad), (w.grad, w32.grad), (b.grad, b32.grad)]:
        assert rel_err(got, want) < 2e-2


@gpu
@needs_cuda
@pytest.mark.parametrize("V", [32000, 151936])
@pytest.mark.parametrize("B", [1, 64])
def test_gpu_constrained_argmax_decode_shapes(V, B):
    H, K_ = 4096, 12
    g = _gen(V + B)
    W = _randn(V, H, gen=g, dtype=torch.bfloat16)
    hidden = _randn(B, H, gen=g, dtype=torch.bfloat16)
    ids = _allowed(B, K_, V, g, min_valid=2)
    W[ids[0, 0]] = W[ids[0, 0]] * 0 + hidden[0]  # force a tie on row 0 between two ids
    W[ids[0, 1]] = W[ids[0, 0]]
    got_ids, got_logits = constrained_argmax(hidden, W, ids, True)
    _check_argmax(hidden, W, ids.cuda(), None, got_ids, got_logits, atol=2e-2)
    assert int(got_ids[0]) == min(int(ids[0, 0]), int(ids[0, 1]))


# ------------------------------------------------------------------ the two-GEMM path and the per-shape choice
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("recompute", [False, True])
def test_two_gemm_forward_and_backward_match_the_reference(act, bias, recompute):
    """The CUDA default (two BLAS GEMMs into one output) is plain torch: its numerics are checked here on CPU."""
    xf, xt, w, b = _concat_inputs(37, 24, 40, 48, torch.float32, bias, seed=_seed("2g", act, bias))
    xt.requires_grad_(True)
    w.requires_grad_(True)
    if b is not None:
        b.requires_grad_(True)
    out = fused_concat_linear(xf, xt, w, b, act, impl="two_gemm", recompute=recompute)
    ref_inputs = [t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None for t in (xf, xt, w, b)]
    ref = fused_concat_linear_reference(*ref_inputs, act)
    assert rel_err(out, ref) < FWD_TOL[torch.float32]
    go = torch.randn(out.shape, generator=_gen(3))
    out.backward(go)
    ref.backward(go)
    for mine, theirs in zip((xt, w, b), ref_inputs[1:]):
        if mine is not None:
            assert rel_err(mine.grad, theirs.grad) < BWD_TOL[torch.float32]
    assert xf.grad is None  # the frozen input gets no gradient GEMM
    with torch.no_grad():  # inference: the activation runs in place on the GEMM output
        assert rel_err(fused_concat_linear(xf, xt, w, b, act, impl="two_gemm"), ref) < FWD_TOL[torch.float32]


def test_cuda_default_is_two_gemm_and_a_recorded_choice_wins(monkeypatch):
    """The dispatch as it runs on CUDA (the device is what is faked here: `resolve_backend` answers as on CUDA)."""
    cl = K.concat_linear
    monkeypatch.setattr(cl, "resolve_backend", lambda backend, *t: "torch" if backend == "torch" else "triton")
    monkeypatch.setattr(cl, "_CHOICES", {})
    ran = []
    real = cl._run
    monkeypatch.setattr(cl, "_run", lambda impl, *a: ran.append(impl) or real("cat" if impl == "triton" else impl, *a))
    xf, xt, w, b = _concat_inputs(100, 16, 16, 32, torch.float32, True, seed=4)
    with torch.no_grad():
        out = fused_concat_linear(xf, xt, w, b)
    assert ran == ["two_gemm"] and rel_err(out, fused_concat_linear_reference(xf, xt, w, b)) < 1e-5
    (key, record), = cl.concat_linear_choices().items()
    assert record == {"impl": "two_gemm", "how": "default"} and "/128/32/16/16/1/False" in key  # M 100 -> bucket 128
    cl.record_choice(cl.choice_key(xf, 32, 16, 1, False), "cat", "measured")
    with torch.no_grad():
        fused_concat_linear(xf[:70], xt[:70], w, b)  # same bucket: the recorded choice
        fused_concat_linear(xf, xt, w, b, backend="triton")  # named explicitly: the kernel
    assert ran == ["two_gemm", "cat", "triton"]
    with pytest.raises(ValueError, match="impl must be one of"):
        fused_concat_linear(xf, xt, w, b, impl="cublas")


def test_token_counts_share_an_autotune_bucket():
    cl = K.concat_linear
    assert [cl.m_bucket(m) for m in (1, 16, 17, 100, 128, 129, 8192, 8193)] == [16, 16, 32, 128, 128, 256, 8192, 16384]
    assert "M_BUCKET" in cl._concat_linear_kernel.keys and "M" not in cl._concat_linear_kernel.keys


def test_more_than_128_allowed_ids_fall_back_inside_the_dispatcher(monkeypatch):
    cd = K.constrained_decode
    monkeypatch.setattr(cd, "_launch", lambda *a, **k: pytest.fail("the kernel cannot take K > 128"))
    g = _gen(9)
    hidden, weight = _randn(3, 32, gen=g), _randn(400, 32, gen=g)
    allowed = torch.stack([torch.randperm(400, generator=g)[:200] for _ in range(3)]).to(DEV)
    got = constrained_argmax(hidden, weight, allowed, backend="triton")
    assert torch.equal(got, constrained_argmax_reference(hidden, weight, allowed))
