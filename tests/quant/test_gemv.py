"""The split-K GEMV that serves decode rows (M <= GEMV_MAX_M) of the weight-only quantized
matmuls: kernel vs float64 references, which kernel runs at which M, the split of K (forced and
chosen), the deterministic fixed-order reduction, and the grid it plans at Llama sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from perfml import _backend, quant
from perfml.quant import kernels
from tests.utils import assert_matches_reference

pytest.importorskip("triton")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
N, K = 96, 320  # N: 3 int8 blocks of 32 with a tail; K: tails in every BLOCK_K
LLAMA = (2048, 4096, 5120, 8192, 11008, 14336)


class _Spy:
    """Stands in for a Triton kernel in the module: logs each launch's grid, then launches."""

    def __init__(self, kernel, log: list) -> None:
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        self.log.append(tuple(grid))
        return self.kernel[grid]


@pytest.fixture
def launches(monkeypatch) -> dict[str, list]:
    """{kernel name: [grid of each launch]} for the three kernels of perfml.quant.kernels."""
    log: dict[str, list] = {}
    for name in ("_wq_mm_kernel", "_wq_gemv_kernel", "_wq_gemv_reduce_kernel"):
        monkeypatch.setattr(kernels, name, _Spy(getattr(kernels, name), log.setdefault(name, [])))
    return log


def _int8(n: int, k: int, dtype: torch.dtype):
    w_q, scale = quant.methods.quantize_int8_per_channel(torch.randn(n, k))
    return w_q, scale.to(dtype)


def _int8_ref(x, w_q, scale, dtype):
    ref64 = x.double() @ (w_q.double() * scale.double()[:, None]).T
    return ref64, F.linear(x, (w_q.float() * scale.float()[:, None]).to(dtype))


def _int4(n: int, k: int, group: int, dtype: torch.dtype):
    packed, scale, zero = quant.methods.quantize_int4_per_group(torch.randn(n, k), group)
    return packed, scale.to(dtype), zero


def _int4_ref(x, packed, scale, zero, group, dtype):
    w64 = kernels.dequantize_int4_ref(packed, scale, zero, group).double()[:, : x.shape[-1]]
    if dtype != torch.float32:
        w64 = w64.to(dtype).double()  # the kernels round dequantized weights to x's dtype
    return x.double() @ w64.T, F.linear(x, w64.to(dtype))


def _run(fn, *args):
    with _backend.force("triton"):
        return fn(*args)


# --- kernel vs float64 ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 8])
def test_int8_gemv_matches_float64(m, dtype, launches, poison_empty):
    w_q, scale = _int8(N, K, dtype)
    x = torch.randn(m, K).to(dtype)
    out = _run(kernels.w8a16_mm, x, w_q, scale)
    assert_matches_reference(out, *_int8_ref(x, w_q, scale, dtype))
    assert launches["_wq_mm_kernel"] == [], "decode rows must not take the tiled kernel"
    plan = kernels._gemv_plan(m, N, K, None, kernels.DEFAULT_SMS)
    assert launches["_wq_gemv_kernel"] == [(plan.n_blocks, 2)], "K = 320 is two int8 tiles"
    assert len(launches["_wq_gemv_reduce_kernel"]) == 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_int4_gemv_matches_float64(m, group, dtype, launches, poison_empty):
    # K = 320 is no multiple of 128: the last group is padded; 64 and 32 have tails in a tile
    packed, scale, zero = _int4(N, K, group, dtype)
    x = torch.randn(m, K).to(dtype)
    out = _run(kernels.w4a16_mm, x, packed, scale, zero, group)
    assert_matches_reference(out, *_int4_ref(x, packed, scale, zero, group, dtype))
    assert launches["_wq_mm_kernel"] == []
    ((_, split),) = launches["_wq_gemv_kernel"]
    assert split > 1


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_one_row_past_the_threshold_takes_the_tiled_kernel(fmt, launches, poison_empty):
    assert kernels.GEMV_MAX_M == 8, "the documented threshold: M <= 8 is decode"
    m = 9  # the M = 8 side is checked by the tests above (no tiled launch)
    x = torch.randn(m, K).to(torch.bfloat16)
    if fmt == "int8":
        w_q, scale = _int8(N, K, torch.bfloat16)
        out = _run(kernels.w8a16_mm, x, w_q, scale)
        ref = _int8_ref(x, w_q, scale, torch.bfloat16)
    else:
        packed, scale, zero = _int4(N, K, 64, torch.bfloat16)
        out = _run(kernels.w4a16_mm, x, packed, scale, zero, 64)
        ref = _int4_ref(x, packed, scale, zero, 64, torch.bfloat16)
    assert_matches_reference(out, *ref)
    assert launches["_wq_gemv_kernel"] == [] and len(launches["_wq_mm_kernel"]) == 1


@pytest.mark.parametrize(
    "n,k,group",
    [(37, 97, 32), (5, 70, 64), (130, 129, 128), (1, 33, 32)],
    ids=["odd-k", "k-pad-past-a-tile", "tails", "one-output"],
)
def test_int4_gemv_awkward_shapes(n, k, group, poison_empty):
    """Odd K (the last byte's high nibble is padding), K short of a group, N under a block."""
    packed, scale, zero = _int4(n, k, group, torch.float16)
    x = torch.randn(2, k).to(torch.float16)
    out = _run(kernels.w4a16_mm, x, packed, scale, zero, group)
    assert_matches_reference(out, *_int4_ref(x, packed, scale, zero, group, torch.float16))


@pytest.mark.parametrize("n,k", [(37, 97), (200, 513), (1, 1)])
def test_int8_gemv_awkward_shapes(n, k, poison_empty):
    w_q, scale = _int8(n, k, torch.float32)
    x = torch.randn(5, k)
    out = _run(kernels.w8a16_mm, x, w_q, scale)
    assert_matches_reference(out, *_int8_ref(x, w_q, scale, torch.float32))


@pytest.mark.parametrize("m", [2, 9], ids=["gemv", "tiled"])
@pytest.mark.parametrize("dtype,bits", [(torch.float16, 10), (torch.bfloat16, 7)])
def test_int4_weights_are_rounded_to_x_dtype_before_the_product(dtype, bits, m, poison_empty):
    """Both kernels multiply by dequantized weights rounded to x's dtype (the references'
    contract). Random data cannot tell: unrounded weights land within the tolerance. Here
    zero = 0, scale = 1 + j ulp (j odd), q = 5 where x = 1 and q = 4 where x = -1.25: unrounded,
    each 5 * scale cancels a 1.25 * 4 * scale exactly and the output is 0; but 5 * scale is not
    representable in x's dtype (4 * scale is), so the rounded weights leave the sum of their
    rounding errors, which a kernel that skips the rounding (even on one nibble) misses."""
    n, k, group = 24, 64, 32
    plus = torch.rand(n, k).argsort(dim=1) < k // 2  # half of each row +1, at random places
    plus = plus[:1].expand(n, k)  # x is shared by the rows: one sign pattern
    q = torch.where(plus, 5, 4)
    j = torch.randint(0, 8, (n, 1)) * 2 + 1
    scale = (1 + j * 2.0**-bits).expand(n, k // group).to(dtype)
    zero = torch.zeros(n, k // group, dtype=torch.uint8)
    packed = kernels.pack_int4(q)
    x = torch.where(plus[:1], 1.0, -1.25).expand(m, k).to(dtype)
    out = _run(kernels.w4a16_mm, x, packed, scale, zero, group)
    ref64, baseline = _int4_ref(x, packed, scale, zero, group, dtype)
    assert ref64.abs().min() > 0, "the rounding errors must not cancel out"
    assert_matches_reference(out, ref64, baseline)


# --- the split of K ------------------------------------------------------------------------------


@pytest.mark.parametrize("split", [1, 3, 4, 10, 99])
def test_forced_splits_all_agree_with_the_reference(split, monkeypatch, launches, poison_empty):
    """group 32: K = 320 is ten int4 tiles. 3 splits take 4 + 4 + 2 tiles, 4 take 3 + 3 + 3 + 1
    (the plan never leaves a split empty), 99 is capped at one tile per split; 1 writes the
    output from the GEMV itself, no workspace and no reduction."""
    monkeypatch.setattr(kernels, "_gemv_split", lambda *_: split)
    packed, scale, zero = _int4(N, K, 32, torch.bfloat16)
    x = torch.randn(4, K).to(torch.bfloat16)
    out = _run(kernels.w4a16_mm, x, packed, scale, zero, 32)
    assert_matches_reference(out, *_int4_ref(x, packed, scale, zero, 32, torch.bfloat16))
    ((_, used),) = launches["_wq_gemv_kernel"]
    assert used == {1: 1, 3: 3, 4: 4, 10: 10, 99: 10}[split]
    assert len(launches["_wq_gemv_reduce_kernel"]) == (0 if split == 1 else 1)


@pytest.mark.parametrize("split", [1, 3])
def test_int8_scale_is_applied_once_on_either_path(split, monkeypatch, launches, poison_empty):
    """The int8 scale belongs in the GEMV's store with one split and in the reduction with
    several: scales far from 1 catch a path that applies it twice or never."""
    monkeypatch.setattr(kernels, "_gemv_split", lambda *_: split)
    w_q, _ = _int8(N, 700, torch.float32)
    scale = torch.rand(N) * 100 + 0.01
    x = torch.randn(2, 700)
    out = _run(kernels.w8a16_mm, x, w_q, scale)
    assert_matches_reference(out, *_int8_ref(x, w_q, scale, torch.float32))
    assert launches["_wq_gemv_kernel"][0][1] == split


def test_few_sms_mean_no_split(monkeypatch, launches, poison_empty):
    """The split comes from the SM count: with 1 SM, 3 blocks of N already fill it."""
    monkeypatch.setattr(kernels, "_sm_count", lambda device: 1)
    w_q, scale = _int8(N, K, torch.float16)
    x = torch.randn(1, K).to(torch.float16)
    out = _run(kernels.w8a16_mm, x, w_q, scale)
    assert_matches_reference(out, *_int8_ref(x, w_q, scale, torch.float16))
    assert launches["_wq_gemv_kernel"] == [(3, 1)] and launches["_wq_gemv_reduce_kernel"] == []


def test_split_reduction_is_deterministic(monkeypatch):
    monkeypatch.setattr(kernels, "_gemv_split", lambda *_: 5)
    packed, scale, zero = _int4(N, K, 32, torch.float32)
    x = torch.randn(3, K)
    first = _run(kernels.w4a16_mm, x, packed, scale, zero, 32)
    second = _run(kernels.w4a16_mm, x, packed, scale, zero, 32)
    assert torch.equal(first, second)


# --- strides and batches -------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_gemv_takes_non_contiguous_x(fmt, poison_empty):
    x = torch.randn(K, 3).to(torch.bfloat16).T  # [3, K] with a stride of 3 along K
    assert x.stride() == (1, 3)
    if fmt == "int8":
        w_q, scale = _int8(N, K, torch.bfloat16)
        out = _run(kernels.w8a16_mm, x, w_q, scale)
        ref = _int8_ref(x, w_q, scale, torch.bfloat16)
    else:
        packed, scale, zero = _int4(N, K, 64, torch.bfloat16)
        out = _run(kernels.w4a16_mm, x, packed, scale, zero, 64)
        ref = _int4_ref(x, packed, scale, zero, 64, torch.bfloat16)
    assert_matches_reference(out, *ref)


def test_gemv_takes_batched_strided_rows(launches, poison_empty):
    """[2, 3, K], the first half of each [2 K] row: 6 rows 2 K apart, still decode-sized."""
    x = torch.randn(2, 3, 2 * K)[..., :K]
    assert x.reshape(-1, K).stride() == (2 * K, 1)
    w_q, scale = _int8(N, K, torch.float32)
    out = _run(kernels.w8a16_mm, x, w_q, scale)
    assert out.shape == (2, 3, N)
    ref64, base = _int8_ref(x.reshape(6, K), w_q, scale, torch.float32)
    assert_matches_reference(out.reshape(6, N), ref64, base)
    assert len(launches["_wq_gemv_kernel"]) == 1


# --- the plan at Llama sizes ---------------------------------------------------------------------


@pytest.mark.parametrize("sms", [132, 114])  # H100/H200 SXM, H100 PCIe
@pytest.mark.parametrize("fmt", [None, 32, 64, 128], ids=["int8", "g32", "g64", "g128"])
def test_plan_spreads_llama_weights_over_every_sm(fmt, sms):
    """Every Llama projection at decode gets 2 programs per SM or more; a split grid stays
    at 4 per SM or fewer (more partials buy no parallelism); splits are balanced in tiles."""
    for m in range(1, kernels.GEMV_MAX_M + 1):
        for n in LLAMA:
            for k in LLAMA:
                plan = kernels._gemv_plan(m, n, k, fmt, sms)
                programs = plan.n_blocks * plan.split_k
                where = f"m={m} n={n} k={k}: {plan}"
                assert programs >= 2 * sms, where
                assert plan.split_k == 1 or programs <= 4 * sms, where
                k_tiles = -(-k // plan.block_k)
                assert (plan.split_k - 1) * plan.tiles_per_split < k_tiles, where
                assert plan.split_k * plan.tiles_per_split >= k_tiles, where
                if fmt is not None:
                    assert fmt % plan.block_k == 0, "an int4 tile must lie inside one group"


# --- errors --------------------------------------------------------------------------------------


def test_int4_group_errors_are_clear():
    packed, scale, zero = _int4(8, 64, 32, torch.float32)
    x = torch.randn(1, 64)
    with pytest.raises(ValueError, match="power of two"):
        kernels.w4a16_mm(x, packed, scale, zero, 24)
    with pytest.raises(ValueError, match="multiple of group_size"):
        kernels.w4a16_mm(x, packed[:, :24], scale, zero, 32)


# --- on a GPU ------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_gemv_is_graph_capturable_and_deterministic_on_cuda(fmt):
    """Llama-sized decode: captured in a CUDA graph (no host syncs in the launcher), replayed
    on new inputs, bit-identical to the eager call, close to the fp32 reference."""
    dev, dtype, n, k = torch.device("cuda"), torch.bfloat16, 4096, 4096
    if fmt == "int8":
        w_q, scale = _int8(n, k, dtype)
        args, fn = (w_q.to(dev), scale.to(dev)), kernels.w8a16_mm
    else:
        packed, scale, zero = _int4(n, k, 64, dtype)
        args, fn = (packed.to(dev), scale.to(dev), zero.to(dev), 64), kernels.w4a16_mm
    static_x = torch.randn(1, k, device=dev, dtype=dtype)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(static_x, *args)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(static_x, *args)
    static_x.copy_(torch.randn(1, k, device=dev, dtype=dtype))
    graph.replay()
    eager = fn(static_x, *args)
    assert torch.equal(static_out, eager)
    if fmt == "int8":
        ref = kernels.w8a16_mm_ref(static_x.float(), *args)
    else:
        ref = kernels.w4a16_mm_ref(static_x, *args).float()
    rel = (static_out.float() - ref.float()).norm() / ref.float().norm()
    assert rel < 1e-2, rel
