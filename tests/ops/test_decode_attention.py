"""perfml.ops.decode_attention against a float64 reference, the cache write, and its guards.

On machines without CUDA the Triton kernels run in interpret mode (tests/conftest.py), so caches
are short (37 or 64 slots). The default blocks hold 32 or 64 slots, so most tests shrink the tiles
to 16 slots and set the number of splits (the `plan` fixture) to reach the multi-tile, multi-split
and empty-split paths. Every cache slot from `position` on is NaN before the call: the output
must not see them, slot `position` must come out holding k and v, and every other slot must keep
its bits (NaN payloads included).
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

from perfml import _backend
from perfml.ops import decode_attention, decode_attention_ref
from tests.utils import assert_matches_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
mod = importlib.import_module("perfml.ops.decode_attention")


@pytest.fixture
def plan(monkeypatch):
    """plan(splits=None, block_l=16, block_g=None): force the launcher's tile and split choices
    (None keeps the launcher's own)."""

    def force(splits=None, block_l=16, block_g=None):
        real = mod._config

        def config(g, d, dtype):
            bg, bl, warps = real(g, d, dtype)
            return block_g or bg, block_l or bl, warps

        monkeypatch.setattr(mod, "_config", config)
        if splits is not None:
            monkeypatch.setattr(mod, "_num_splits", lambda *args: splits)

    return force


def _heads(b, h, d, dtype, layout):
    """A [B, H, 1, D] tensor in one of the layouts q, k, v arrive in."""
    if layout == "proj":  # q_proj(x).view(B, 1, H, D).transpose(1, 2)
        return torch.randn(b, 1, h * d, device=DEVICE, dtype=dtype).view(b, 1, h, d).transpose(1, 2)
    if layout == "contiguous":
        return torch.randn(b, h, 1, d, device=DEVICE, dtype=dtype)
    if layout == "fused":  # a slice of a wider [B, 1, 3 * H * D] projection: not dense
        qkv = torch.randn(b, 1, 3 * h * d, device=DEVICE, dtype=dtype)
        return qkv[..., h * d : 2 * h * d].view(b, 1, h, d).transpose(1, 2)
    if layout == "strided-d":  # no unit stride on the head dim
        return torch.randn(b, h, 1, 2 * d, device=DEVICE, dtype=dtype)[..., 1::2]
    raise AssertionError(layout)


def _inputs(b, hq, hkv, d, length, position, dtype, layout="proj"):
    q = _heads(b, hq, d, dtype, layout)
    k = _heads(b, hkv, d, dtype, layout)
    v = _heads(b, hkv, d, dtype, layout)
    k_cache = torch.randn(b, hkv, length, d, device=DEVICE, dtype=dtype)
    v_cache = torch.randn(b, hkv, length, d, device=DEVICE, dtype=dtype)
    k_cache[:, :, position:] = float("nan")  # the new slot and every later one
    v_cache[:, :, position:] = float("nan")
    return q, k, v, k_cache, v_cache, torch.tensor(position, device=DEVICE)


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _written(cache, new, position):
    """What the cache must hold afterwards: its old bits, `new` in slot `position`."""
    out = cache.clone()
    out[:, :, position] = new[:, :, 0]
    return out


def _baseline(q, k, v, k_cache, v_cache, position, scale=None):
    """Plain PyTorch in the inputs' dtype (what the decoder ran before): SDPA over the cached
    slots before `position` and the new token, GQA through enable_gqa."""
    keys = torch.cat((k_cache[:, :, :position], k), dim=2)
    values = torch.cat((v_cache[:, :, :position], v), dim=2)
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, keys, values, enable_gqa=gqa, scale=scale)


def _check_call(q, k, v, k_cache, v_cache, pos, scale=None):
    """Run the op; check the output against float64 and the caches bit for bit."""
    p = int(pos)
    expect_k, expect_v = _written(k_cache, k, p), _written(v_cache, v, p)
    ref = decode_attention_ref(
        q.double(), k.double(), v.double(), k_cache.double(), v_cache.double(), pos, scale
    )
    base = _baseline(q, k, v, k_cache, v_cache, p, scale)
    out = decode_attention(q, k, v, k_cache, v_cache, pos, scale)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert_matches_reference(out, ref, base)
    assert torch.equal(_bits(k_cache), _bits(expect_k)), "k_cache: wrong slot written or bits lost"
    assert torch.equal(_bits(v_cache), _bits(expect_v)), "v_cache: wrong slot written or bits lost"
    return out


# (B, Hq, Hkv, D, L, position, layout): GQA ratios 1, 2, 4; D = 16, 64, 80; position 0, 1, mid,
# L - 1 (L = 37: a partial last tile; L = 64: whole tiles)
CASES = [
    (1, 4, 4, 16, 37, 0, "proj"),
    (3, 4, 2, 64, 37, 1, "contiguous"),
    (1, 8, 2, 80, 37, 18, "proj"),
    (3, 2, 1, 80, 37, 36, "fused"),
    (1, 4, 1, 64, 64, 63, "strided-d"),
    (3, 8, 2, 16, 37, 17, "proj"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("splits", [None, 1, 3], ids=["default-plan", "1-split", "3-splits"])
def test_matches_float64_reference(case, dtype, splits, plan, poison_empty):
    b, hq, hkv, d, length, position, layout = case
    if splits is not None:  # default-plan keeps the launcher's own tiles and splits
        plan(splits=splits)
    _check_call(*_inputs(b, hq, hkv, d, length, position, dtype, layout))


@pytest.mark.parametrize("splits", [2, 5, 8])
def test_more_splits_than_work_and_determinism(splits, plan, poison_empty):
    # 37 slots in 16-slot tiles are at most 3 tiles: later splits are empty at every position
    plan(splits=splits)
    q, k, v, k_cache, v_cache, pos = _inputs(2, 4, 2, 64, 37, 30, torch.bfloat16)
    first = _check_call(q, k, v, k_cache, v_cache, pos)
    again = decode_attention(q, k, v, k_cache, v_cache, pos)  # rewrites the same slot
    assert torch.equal(_bits(first), _bits(again)), "the same call gave different bits"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_several_head_blocks_per_kv_head(dtype, plan, poison_empty):
    # 32 query heads on one kv head in blocks of 16: two programs share the kv head
    plan(splits=2, block_g=16)
    _check_call(*_inputs(2, 32, 1, 16, 37, 20, dtype))


def test_successive_steps_fill_the_cache(plan):
    # a decode loop: each step writes its slot, later steps read it back from the cache
    plan(splits=2)
    b, hq, hkv, d, length = 1, 4, 2, 16, 37
    k_cache = torch.full((b, hkv, length, d), float("nan"), device=DEVICE)
    v_cache = torch.full((b, hkv, length, d), float("nan"), device=DEVICE)
    keys, values = [], []
    for step in range(20):
        q, k, v = (_heads(b, h, d, torch.float32, "proj") for h in (hq, hkv, hkv))
        keys.append(k)
        values.append(v)
        out = decode_attention(q, k, v, k_cache, v_cache, torch.tensor(step, device=DEVICE))
        cached = (torch.cat(x, dim=2).double() for x in (keys, values))
        want = _baseline(q.double(), k.double(), v.double(), *cached, step)
        assert_matches_reference(out, want)
    assert torch.equal(k_cache[:, :, :20], torch.cat(keys, dim=2))
    assert torch.equal(v_cache[:, :, :20], torch.cat(values, dim=2))
    assert k_cache[:, :, 20:].isnan().all() and v_cache[:, :, 20:].isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_scale(dtype, plan, poison_empty):
    plan(splits=2)
    _check_call(*_inputs(2, 4, 2, 64, 37, 25, dtype), scale=0.3)


@pytest.mark.parametrize("layout", ["longer-buffer", "bshd"])
def test_caches_with_their_own_strides(layout, plan, poison_empty):
    # caches that are views: written in place through their strides, never copied
    plan(splits=2)
    b, hq, hkv, d, length, position = 2, 4, 2, 16, 37, 21
    q, k, v, k_cache, v_cache, pos = _inputs(b, hq, hkv, d, length, position, torch.float16)
    if layout == "longer-buffer":  # the first L slots of a longer allocation
        bases = [torch.full((b, hkv, 50, d), 7.0, device=DEVICE, dtype=q.dtype) for _ in "kv"]
        views = [base[:, :, :length] for base in bases]
    else:  # [B, L, Hkv, D] storage seen as [B, Hkv, L, D]
        bases = [torch.empty(b, length, hkv, d, device=DEVICE, dtype=q.dtype) for _ in "kv"]
        views = [base.transpose(1, 2) for base in bases]
    for view, cache in zip(views, (k_cache, v_cache), strict=True):
        view.copy_(cache)
    _check_call(q, k, v, *views, pos)
    if layout == "longer-buffer":
        assert (bases[0][:, :, length:] == 7.0).all() and (bases[1][:, :, length:] == 7.0).all()


def test_reference_backend_agrees(poison_empty):
    inputs = _inputs(2, 4, 2, 80, 37, 12, torch.bfloat16)
    copies = [t.clone() for t in inputs]
    out = decode_attention(*inputs)
    with _backend.force("reference"):
        ref = decode_attention(*copies)
    torch.testing.assert_close(out, ref, atol=1e-2, rtol=1e-2)
    assert torch.equal(_bits(inputs[3]), _bits(copies[3]))
    assert torch.equal(_bits(inputs[4]), _bits(copies[4]))


def test_float64_uses_the_exact_reference():
    q, k, v, k_cache, v_cache, pos = _inputs(1, 4, 2, 16, 37, 9, torch.float64)
    expect_k = _written(k_cache, k, 9)
    want = _baseline(q, k, v, k_cache, v_cache, 9)
    out = decode_attention(q, k, v, k_cache, v_cache, pos)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)
    assert torch.equal(_bits(k_cache), _bits(expect_k))


# --- per-row positions (continuous batching) -------------------------------------------------


def _row_inputs(hq, hkv, d, length, positions, dtype, layout="proj"):
    """_inputs with one position per row: row r's slots from positions[r] on are NaN."""
    b = len(positions)
    q, k, v, k_cache, v_cache, _ = _inputs(b, hq, hkv, d, length, length, dtype, layout)
    for row, p in enumerate(positions):
        k_cache[row, :, p:] = float("nan")
        v_cache[row, :, p:] = float("nan")
    return q, k, v, k_cache, v_cache, torch.tensor(positions, device=DEVICE)


def _check_rows(q, k, v, k_cache, v_cache, pos, scale=None):
    """The per-row call against float64, row by row against the plain-PyTorch baseline, and the
    caches bit for bit (each row's own slot written, every other slot kept)."""
    expect_k, expect_v = k_cache.clone(), v_cache.clone()
    bases = []
    for row, p in enumerate(pos.tolist()):
        expect_k[row, :, p] = k[row, :, 0]
        expect_v[row, :, p] = v[row, :, 0]
        one = (t[row : row + 1] for t in (q, k, v, k_cache, v_cache))
        bases.append(_baseline(*one, p, scale))
    ref = decode_attention_ref(
        q.double(), k.double(), v.double(), k_cache.double(), v_cache.double(), pos, scale
    )
    out = decode_attention(q, k, v, k_cache, v_cache, pos, scale)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert_matches_reference(out, ref, torch.cat(bases))
    assert torch.equal(_bits(k_cache), _bits(expect_k)), "k_cache: wrong slot written or bits lost"
    assert torch.equal(_bits(v_cache), _bits(expect_v)), "v_cache: wrong slot written or bits lost"
    return out, ref


# (Hq, Hkv, D, L, positions per row, layout): 0 and L - 1 among them, GQA 1, 2, 4
ROW_CASES = [
    (4, 2, 16, 37, (0, 36, 17), "proj"),
    (4, 4, 64, 37, (36, 0), "contiguous"),
    (8, 2, 80, 37, (5, 0, 36, 20), "fused"),
    (4, 1, 16, 64, (63, 1, 0), "strided-d"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ROW_CASES, ids=str)
@pytest.mark.parametrize("splits", [None, 1, 3], ids=["default-plan", "1-split", "3-splits"])
def test_per_row_positions_match_float64_reference(case, dtype, splits, plan, poison_empty):
    hq, hkv, d, length, positions, layout = case
    if splits is not None:
        plan(splits=splits)
    _check_rows(*_row_inputs(hq, hkv, d, length, list(positions), dtype, layout))


def test_per_row_positions_equal_one_row_at_a_time(plan):
    # each row of a per-row call is what that row alone gives with a 0-dim position
    plan(splits=2)
    q, k, v, k_cache, v_cache, pos = _row_inputs(4, 2, 16, 37, [30, 0, 11], torch.float32)
    alone = []
    for row, p in enumerate(pos.tolist()):
        one = [t[row : row + 1].clone() for t in (q, k, v, k_cache, v_cache)]
        alone.append(decode_attention(*one, torch.tensor(p, device=DEVICE)))
    out = decode_attention(q, k, v, k_cache, v_cache, pos)
    torch.testing.assert_close(out, torch.cat(alone), atol=1e-6, rtol=1e-5)


def test_per_row_reference_backend_agrees(poison_empty):
    inputs = _row_inputs(4, 2, 16, 37, [3, 36, 0], torch.float32)
    copies = [t.clone() for t in inputs]
    out = decode_attention(*inputs)
    with _backend.force("reference"):
        ref = decode_attention(*copies)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(_bits(inputs[3]), _bits(copies[3]))
    assert torch.equal(_bits(inputs[4]), _bits(copies[4]))


def test_per_row_float64_uses_the_exact_reference():
    q, k, v, k_cache, v_cache, pos = _row_inputs(4, 2, 16, 37, [9, 0], torch.float64)
    out = decode_attention(q, k, v, k_cache, v_cache, pos)
    want = torch.cat([_baseline(q[r : r + 1], k[r : r + 1], v[r : r + 1], k_cache[r : r + 1],
                                v_cache[r : r + 1], p) for r, p in enumerate((9, 0))])  # fmt: skip
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("position", [-1, 37])
def test_out_of_range_row_position_raises_on_cpu(position):
    inputs = [t.cpu() for t in _inputs(2, 4, 2, 16, 37, 5, torch.float32)[:5]]
    with pytest.raises(IndexError, match=r"position\[1\] .* out of range for a cache of 37"):
        decode_attention(*inputs, torch.tensor([3, position]))


@pytest.mark.skipif(not _backend.has_triton(), reason="needs triton")
@pytest.mark.parametrize("splits", [1, 3])
def test_kernel_guard_per_row(splits, plan):
    # one row out of range: that row's output is NaN and its caches untouched; the other is right
    plan(splits=splits)
    q, k, v, k_cache, v_cache, _ = _inputs(2, 4, 2, 16, 37, 37, torch.float32)
    pos = torch.tensor([40, 12], device=DEVICE)
    kc, vc = k_cache.clone(), v_cache.clone()
    out = mod._decode_attention_triton(q, k, v, k_cache, v_cache, pos, 16**-0.5)
    assert out[0].isnan().all()
    assert torch.equal(_bits(k_cache[0]), _bits(kc[0])) and torch.equal(
        _bits(v_cache[0]), _bits(vc[0])
    )
    good = decode_attention_ref(*(t[1:].double() for t in (q, k, v, kc, vc)), pos[1:])
    assert_matches_reference(out[1:], good)


def test_per_row_opcheck():
    args = list(_row_inputs(4, 2, 16, 37, [11, 0], torch.float32))
    for t in args[3:5]:
        t.nan_to_num_()
    torch.library.opcheck(torch.ops.perfml.decode_attention.default, (*args, 0.25))


# --- the split plan ---------------------------------------------------------------------------


@pytest.mark.skipif(not _backend.has_triton(), reason="needs triton")
def test_split_plan_at_llama_sizes():
    # about 2 programs per SM (132 assumed off CUDA), never more splits than tiles
    config = mod._config
    _, block_l, _ = config(2, 128, torch.bfloat16)
    assert block_l == 64
    assert mod._num_splits(256, block_l, 1 * 8, 132) == 4  # 4 tiles
    assert mod._num_splits(2048, block_l, 1 * 8, 132) == 32  # 33 wanted, 32 tiles
    assert mod._num_splits(2048, block_l, 16 * 8, 132) == 3  # 128 programs: 3 splits
    assert mod._num_splits(2048, block_l, 64 * 8, 132) == 1  # the batch fills the GPU
    assert mod._num_splits(1 << 16, block_l, 1, 132) == mod._MAX_SPLITS
    assert config(64, 128, torch.bfloat16) == (64, 64, 8)
    assert config(128, 128, torch.float32)[:2] == (32, 32)  # FMA dots: smaller tiles


# --- position range ---------------------------------------------------------------------------


@pytest.mark.parametrize("position", [-1, 37, 100])
def test_out_of_range_position_raises_on_cpu(position):
    inputs = [t.cpu() for t in _inputs(1, 4, 2, 16, 37, 5, torch.float32)[:5]]
    with pytest.raises(IndexError, match=r"position .* out of range for a cache of 37 slots"):
        decode_attention(*inputs, torch.tensor(position))


@pytest.mark.skipif(not _backend.has_triton(), reason="needs triton")
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("position", [-1, 37, 50])
def test_kernel_guard_gives_nan_and_leaves_caches(position, splits, plan):
    # What CUDA does (no host check there): the kernel sees the bad position itself. The caches
    # are the first 37 slots of 64-slot buffers, so a stray write past them would show.
    plan(splits=splits)
    q, k, v, *bases, _ = _inputs(2, 4, 2, 16, 64, 30, torch.float32)
    before = [base.clone() for base in bases]
    k_cache, v_cache = (base[:, :, :37] for base in bases)
    pos = torch.tensor(position, device=DEVICE)
    out = mod._decode_attention_triton(q, k, v, k_cache, v_cache, pos, 0.25)
    assert out.isnan().all()
    for base, old in zip(bases, before, strict=True):
        assert torch.equal(_bits(base), _bits(old))


# --- bad input --------------------------------------------------------------------------------


def _good():
    return _inputs(2, 4, 2, 16, 10, 3, torch.float16)


def _swap(i, fn):
    def change(*args):
        args = list(args)
        args[i] = fn(args[i])
        return args

    return change


@pytest.mark.parametrize(
    "change,error,message",
    [
        (_swap(0, lambda q: q[0]), ValueError, r"q must be 4-D \[B, Hq, 1, D\]"),
        (_swap(3, lambda c: c[0]), ValueError, r"k_cache must be 4-D \[B, Hkv, L, D\]"),
        (_swap(0, lambda q: q.expand(2, 4, 3, 16)), ValueError, "q must hold one token"),
        (_swap(1, lambda k: k.float()), TypeError, "k must have q's dtype"),
        (_swap(4, lambda c: c.half().bfloat16()), TypeError, "v_cache must have q's dtype"),
        (lambda *a: [t.int() for t in a[:5]] + [a[5]], TypeError, "q must be fp32, bf16 or fp16"),
        (_swap(2, lambda v: v.to("meta")), ValueError, "q is on .* but v is on meta"),
        (_swap(5, lambda p: p.to("meta")), ValueError, "q is on .* but position is on meta"),
        (_swap(5, lambda p: p.int()), TypeError, "position must be a 0-dim int64 tensor"),
        (_swap(5, lambda p: p.reshape(1, 1)), TypeError, "or a 1-D one of B entries"),
        (_swap(5, lambda p: p.reshape(1)), ValueError, "per-row position must have B=2 entries"),
        (_swap(5, lambda p: 3), TypeError, "position must be a Tensor"),
        (_swap(1, lambda k: k[:, :1]), ValueError, r"k must be \[B, Hkv, 1, D\]"),
        (_swap(2, lambda v: v[..., :8]), ValueError, r"v must be \[B, Hkv, 1, D\]"),
        (_swap(4, lambda c: c[:, :, :5]), ValueError, "k_cache and v_cache must have the same"),
        (
            lambda q, k, v, kc, vc, p: (q, k, v, kc[..., :8], vc[..., :8], p),
            ValueError,
            r"caches must be \[B, Hkv, L, D\] with B=2, D=16",
        ),
        (
            lambda q, k, v, kc, vc, p: (q[:, :3], k, v, kc, vc, p),
            ValueError,
            "q's 3 heads must be a multiple of the caches' 2 kv heads",
        ),
        (
            lambda q, k, v, kc, vc, p: (q, k, v, kc, kc, p),
            ValueError,
            "k_cache and v_cache must be separate tensors",
        ),
    ],
)
def test_bad_input(change, error, message):
    with pytest.raises(error, match=message):
        decode_attention(*change(*_good()))


def test_bad_scale():
    with pytest.raises(TypeError, match="scale must be a finite float"):
        decode_attention(*_good(), scale=float("inf"))
    with pytest.raises(TypeError, match="scale must be a finite float"):
        decode_attention(*_good(), scale="0.1")


def test_head_dim_limit():
    q, k, v, k_cache, v_cache, pos = _inputs(1, 2, 1, 257, 4, 1, torch.float32)
    with pytest.raises(ValueError, match="head_dim must be in 1..256"):
        decode_attention(q, k, v, k_cache, v_cache, pos)


def test_inputs_requiring_grad_are_refused():
    q, k, v, k_cache, v_cache, pos = _good()
    q.requires_grad_()
    with pytest.raises(ValueError, match="inference only"):
        decode_attention(q, k, v, k_cache, v_cache, pos)
    with torch.no_grad():  # under no_grad it runs
        decode_attention(q, k, v, k_cache, v_cache, pos)
    # the registered op itself has no backward
    out = torch.ops.perfml.decode_attention(q, k, v, k_cache, v_cache, pos, 0.25)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        out.sum().backward()


# --- torch.library / torch.compile ------------------------------------------------------------


def test_opcheck():
    args = _inputs(2, 4, 2, 16, 37, 11, torch.float32)
    for t in args[3:5]:
        t.nan_to_num_()  # opcheck compares runs with NaN-unequal tensors otherwise
    torch.library.opcheck(torch.ops.perfml.decode_attention.default, (*args, 0.25))


def test_compile_fullgraph_has_no_graph_break():
    torch._dynamo.reset()
    q, k, v, k_cache, v_cache, pos = _inputs(1, 4, 2, 16, 37, 11, torch.float32)
    k_eager, v_eager = k_cache.clone(), v_cache.clone()

    def step(q, k, v, k_cache, v_cache, pos):
        return decode_attention(q * 2, k, v, k_cache, v_cache, pos).sum(-1)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, v, k_cache, v_cache, pos)
    want = step(q, k, v, k_eager, v_eager, pos)
    torch.testing.assert_close(got, want)
    assert torch.equal(_bits(k_cache), _bits(k_eager))  # the mutation survives compilation
    assert torch.equal(_bits(v_cache), _bits(v_eager))


# --- GPU-only: real sizes, CUDA graphs --------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("length", [256, 2048])
@pytest.mark.parametrize("heads", [(16, 8), (32, 8)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_llama_decode_sizes_on_gpu(length, heads, dtype, poison_empty):
    hq, hkv = heads
    for position in (0, length // 3, length - 1):
        _check_call(*_inputs(1, hq, hkv, 128, length, position, dtype))


@pytest.mark.gpu
def test_cuda_graph_replay_across_positions():
    q, k, v, k_cache, v_cache, pos = _inputs(2, 16, 8, 128, 512, 0, torch.bfloat16)
    k_cache.normal_()
    v_cache.normal_()
    decode_attention(q, k, v, k_cache.clone(), v_cache.clone(), pos)  # compile outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k, v, k_cache, v_cache, pos)
    for position in (0, 1, 100, 511):
        pos.fill_(position)
        for t in (q, k, v):
            t.normal_()
        kc, vc = k_cache.clone(), v_cache.clone()
        want = decode_attention_ref(q, k, v, kc, vc, pos)
        graph.replay()
        torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)
        assert torch.equal(k_cache, kc) and torch.equal(v_cache, vc)


@pytest.mark.gpu
def test_out_of_range_position_on_gpu_gives_nan():
    q, k, v, k_cache, v_cache, _ = _inputs(1, 16, 8, 128, 256, 256, torch.bfloat16)
    before = k_cache.clone()
    out = decode_attention(q, k, v, k_cache, v_cache, torch.tensor(256, device=DEVICE))
    assert out.isnan().all()
    assert torch.equal(_bits(k_cache), _bits(before))
