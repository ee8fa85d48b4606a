"""The roofline of a profiled run: each perfml op and each matmul against the ceilings of the
same machine, measured in the same run.

Ceilings: perfml.bench.ceilings (device-to-device copy bandwidth; dense bf16 and fp32 matmul
rate), the numbers `perfml bench` reports against. On a CPU the same code measures the CPU's
(copies of 4x the last-level cache, a 512^3 matmul).

Bytes of a perfml op call: the benchmark case's minimum-traffic formula (perfml/bench/cost.py:
each input read once, each output written once) at the call's recorded shapes and dtype; a
backward kernel is charged the formula's fwd+bwd traffic minus its fwd traffic. Time: the op's
device time (its kernels) on CUDA, its wall time on CPU. Achieved GB/s = bytes / time, shown
against the copy ceiling (the bandwidth roof): memory-bound kernels live there. Matmuls
(aten::mm/addmm/bmm/baddbmm, FLOPs counted by the profiler) and perfml's linear_cross_entropy
(the bench FLOP formula: 2NHV per matmul, 3 matmuls when it computes gradients) are shown
in TFLOP/s against the matmul ceiling of their dtype (the compute roof).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from perfml.bench.cost import (
    add_rms_norm_bytes,
    cross_entropy_bytes,
    glu_bytes,
    layer_norm_bytes,
    linear_cross_entropy_flops,
    rms_norm_bytes,
    rope_bytes,
    softmax_bytes,
)

# the profiler's names of input dtypes
_DTYPES = {
    "float": torch.float32,
    "double": torch.float64,
    "c10::Half": torch.float16,
    "c10::BFloat16": torch.bfloat16,
}
_MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
_MATMUL_CEILING = {torch.bfloat16: "matmul_bf16_tflops", torch.float16: "matmul_bf16_tflops"}

Shape = tuple[int, ...]
Formula = Callable[[Shape, torch.dtype, str], int]


def _first(shapes: Sequence[list[int]], _: Sequence[Any]) -> Shape:
    return tuple(shapes[0])


def _rows(shapes: Sequence[list[int]], _: Sequence[Any]) -> Shape:
    *lead, v = shapes[0]
    return (math.prod(lead), v)


def _rope_shape(shapes: Sequence[list[int]], concrete: Sequence[Any]) -> Shape:
    """(B, Hq, Hk, T, D) from q and k, whose layout unsqueeze_dim (argument 5) gives."""
    q, k = shapes[0], shapes[1]
    if str(concrete[5]) == "2":  # [B, T, H, D]
        return (q[0], q[2], k[2], q[1], q[3])
    return (q[0], q[1], k[1], q[2], q[3])


def _flag(index: int) -> Callable[[Sequence[Any]], bool]:
    return lambda concrete: str(concrete[index]).lower() in ("true", "1")


@dataclass(frozen=True)
class _Traffic:
    formula: Formula
    shape: Callable[[Sequence[list[int]], Sequence[Any]], Shape]
    mode: str  # "fwd", "bwd" (fwd+bwd minus fwd), or "fwd+bwd"
    grad_in_fwd: Callable[[Sequence[Any]], bool] | None = None  # fwd kernels that write grads


TRAFFIC: dict[str, _Traffic] = {
    "perfml::rms_norm_fwd": _Traffic(rms_norm_bytes, _first, "fwd"),
    "perfml::rms_norm_bwd": _Traffic(rms_norm_bytes, _first, "bwd"),
    "perfml::add_rms_norm_fwd": _Traffic(add_rms_norm_bytes, _first, "fwd"),
    "perfml::add_rms_norm_bwd": _Traffic(add_rms_norm_bytes, _first, "bwd"),
    "perfml::layer_norm_fwd": _Traffic(layer_norm_bytes, _first, "fwd"),
    "perfml::layer_norm_bwd": _Traffic(layer_norm_bytes, _first, "bwd"),
    "perfml::glu_fwd": _Traffic(glu_bytes, _first, "fwd"),
    "perfml::glu_bwd": _Traffic(glu_bytes, _first, "bwd"),
    "perfml::glu_bwd_inplace": _Traffic(glu_bytes, _first, "bwd"),
    "perfml::softmax_fwd": _Traffic(softmax_bytes, _first, "fwd"),
    "perfml::softmax_bwd": _Traffic(softmax_bytes, _first, "bwd"),
    "perfml::rope_fwd": _Traffic(rope_bytes, _rope_shape, "fwd"),
    "perfml::rope_bwd": _Traffic(rope_bytes, _rope_shape, "bwd"),
    # the loss kernel writes the logits' gradient in its forward when training (compute_grad)
    "perfml::cross_entropy_fwd": _Traffic(cross_entropy_bytes, _rows, "fwd", _flag(7)),
    "perfml::cross_entropy_fwd_inplace": _Traffic(cross_entropy_bytes, _rows, "fwd+bwd"),
}


@dataclass
class RooflineRow:
    """One (op, shape, dtype) of the profiled steps, all its calls together."""

    op: str
    shape: str
    dtype: str
    calls: int
    ms_per_call: float
    bytes_per_call: int | None = None
    gbps: float | None = None
    pct_of_copy: float | None = None
    flops_per_call: int | None = None
    tflops: float | None = None
    pct_of_matmul: float | None = None


def measure_ceilings(device: torch.device) -> dict[str, float | None]:
    """The bench harness's ceilings of this machine, measured now (quick sizes)."""
    from perfml.bench.ceilings import measure_ceilings as measure
    from perfml.bench.timing import make_timer

    return measure(make_timer(device, quick=True), device, quick=True)


def _op_time_us(event: Any, device: torch.device) -> float:
    return event.device_time_total if device.type == "cuda" else event.cpu_time_total


def _traffic_bytes(
    spec: _Traffic, shape: Shape, dtype: torch.dtype, concrete: Sequence[Any]
) -> int:
    mode = spec.mode
    if spec.grad_in_fwd is not None and spec.grad_in_fwd(concrete):
        mode = "fwd+bwd"
    if mode == "bwd":
        return spec.formula(shape, dtype, "fwd+bwd") - spec.formula(shape, dtype, "fwd")
    return spec.formula(shape, dtype, mode)


def _lce_flops(shapes: Sequence[list[int]], concrete: Sequence[Any]) -> int:
    (n, h), v = shapes[0], shapes[1][0]
    grads = _flag(11)(concrete) or _flag(12)(concrete)
    return linear_cross_entropy_flops((n, h, v), "fwd+bwd" if grads else "fwd")


def _matmul_ceiling(ceilings: dict[str, Any], dtype: torch.dtype | None) -> float | None:
    return ceilings.get(_MATMUL_CEILING.get(dtype, "matmul_fp32_tflops"))


def roofline_rows(
    events: Sequence[Any], device: torch.device, ceilings: dict[str, Any]
) -> list[RooflineRow]:
    """Rows for every perfml op with a traffic formula and every matmul among the profiler's
    FunctionEvents (recorded with record_shapes and with_flops), slowest total first."""
    groups: dict[tuple[Any, ...], list[Any]] = {}
    for e in events:
        name = e.name
        is_perfml = name in TRAFFIC or name == "perfml::linear_cross_entropy_fwd"
        if not (is_perfml or (name in _MATMULS and e.flops)):
            continue
        parent = e.cpu_parent
        if parent is not None and parent.name == name:  # an op's own inner dispatch record
            continue
        key = (name, tuple(map(tuple, e.input_shapes)), tuple(e.input_dtypes))
        groups.setdefault(key, []).append(e)

    rows = []
    for (name, shapes, dtypes), calls in groups.items():
        dtype = next((_DTYPES[d] for d in dtypes if d in _DTYPES), None)
        concrete = list(calls[0].concrete_inputs or []) + [""] * 16
        us = sum(_op_time_us(e, device) for e in calls)
        if us <= 0:
            continue
        per_call_s = us / len(calls) * 1e-6
        row = RooflineRow(
            op=name,
            shape=" ".join("x".join(map(str, s)) for s in shapes if s),
            dtype=str(dtype).removeprefix("torch.") if dtype else "-",
            calls=len(calls),
            ms_per_call=per_call_s * 1e3,
        )
        if name in TRAFFIC and dtype is not None:
            spec = TRAFFIC[name]
            row.bytes_per_call = _traffic_bytes(spec, spec.shape(shapes, concrete), dtype, concrete)
            row.gbps = row.bytes_per_call / per_call_s / 1e9
            if ceilings.get("copy_gbps"):
                row.pct_of_copy = 100 * row.gbps / ceilings["copy_gbps"]
        else:
            flops = (
                _lce_flops(shapes, concrete)
                if name == "perfml::linear_cross_entropy_fwd"
                else int(sum(e.flops for e in calls) / len(calls))
            )
            row.flops_per_call = flops
            row.tflops = flops / per_call_s / 1e12
            ceiling = _matmul_ceiling(ceilings, dtype)
            if ceiling:
                row.pct_of_matmul = 100 * row.tflops / ceiling
        rows.append(row)
    rows.sort(key=lambda r: -r.ms_per_call * r.calls)
    return rows
