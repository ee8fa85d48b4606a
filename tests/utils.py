"""The tolerance policy every op test applies (see DESIGN.md, "Tests").

fp32 results: max abs error against the float64 reference <= 1e-5 x the reference's max abs, or,
where the math itself cancels (N=1 RMSNorm's dx is eps / (x**2 + eps) small), no more than 2x the
plain-PyTorch fp32 error.
bf16/fp16 results: error no more than 2x the error of the plain-PyTorch computation in the same
dtype (flash-attention's rule), plus a floor far below one ulp, and never NaN where the reference
is finite.
"""

from __future__ import annotations

import torch

FP32_RTOL = 1e-5


def max_err(actual: torch.Tensor, ref64: torch.Tensor) -> float:
    return (actual.double() - ref64).abs().max().item() if ref64.numel() else 0.0


def assert_matches_reference(
    actual: torch.Tensor,
    ref64: torch.Tensor,
    baseline: torch.Tensor | None = None,
    *,
    name: str = "output",
) -> None:
    """`actual` (any dtype) vs the float64 reference `ref64`; `baseline` is the plain-PyTorch
    result in actual's dtype (required for bf16/fp16)."""
    assert actual.shape == ref64.shape, (
        f"{name}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    )
    finite = torch.isfinite(ref64)
    bad = finite & ~torch.isfinite(actual.double())
    assert not bad.any(), (
        f"{name}: {int(bad.sum())} non-finite values where the reference is finite"
    )
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    err = max_err(actual, ref64)
    if actual.dtype in (torch.float32, torch.float64):
        limit = FP32_RTOL * max(scale, 1e-30)
        if baseline is not None:
            limit = max(limit, 2 * max_err(baseline, ref64))
        assert err <= limit, (
            f"{name}: max abs error {err:.3e} > {limit:.3e} (fp32 rtol {FP32_RTOL})"
        )
        return
    assert baseline is not None, f"{name}: a {actual.dtype} check needs the same-dtype baseline"
    base_err = max_err(baseline, ref64)
    limit = 2 * base_err + 1e-6 * max(scale, 1e-30)
    assert err <= limit, (
        f"{name}: max abs error {err:.3e} > 2 x plain-PyTorch {actual.dtype} error {base_err:.3e}"
    )
