"""ONNX export with measured parity: `to_onnx(model, example_inputs, path)` -> ExportReport.

The path: torch.export.export (non-strict) captures the model with perfml's ops as opaque nodes;
every custom op is checked against the translation table first, so an op with no ONNX form is
reported by name together with the module that called it, before any conversion work; then
torch.onnx.export(dynamo=True) converts the program with perfml.export.translations as its
custom_translation_table. onnxscript's constant folding and dead-code removal run afterwards, but
not its pattern fusions (Attention / RotaryEmbedding / RMSNormalization rewrites of eager
subgraphs): at opset 23 its RotaryEmbedding fusion turned the HF-style rotary arithmetic into a
node that onnxruntime 1.31 rejects as soon as cos/sin broadcast over a batch larger than one.
perfml's own ops already map to the standard fused nodes where that is exact.

Dynamic shapes: dim 0 of every input is "batch" and dim 1 "seq" (each optional), except inputs
of size 1 there while another input is larger (broadcast tables such as cos/sin [1, T, D]), which
stay static. Examples need size >= 2 along a dynamic dim: torch.export freezes size-1 dims.

Verification (verify=True) never reuses the example: it draws fresh inputs at a batch and a
sequence length different from the example's (inside the ranges torch.export proved valid), runs
them through the PyTorch model and through onnxruntime's CPU provider, and compares every output:
  max_abs_err = max |onnx - torch|,  max_rel_err = max_abs_err / max |torch|   (per output, worst)
An export fails (ParityError, with the numbers) when max_rel_err exceeds TOLERANCE[dtype] of the
output: fp32 1e-4, fp16 1e-2, bf16 5e-2, fp64 1e-7; integer outputs must match exactly. These are
a few hundred ulps of each format: loose enough for a different summation order in the runtime's
matmuls, tight enough that a wrong translation (a missing cast, a swapped rotate_half) fails.

Weights over EXTERNAL_DATA_THRESHOLD (protobuf's 2 GiB limit on one message) go to
`<path>.data` beside the model (ONNX external data); smaller models are one self-contained file.
The files are written into a temporary folder beside `path` and moved into place only once the
export (and the verification, with verify=True) succeeded, so a failure never leaves a
half-made model nor replaces an earlier one. Last comes `<path>.manifest.json` (perfml.lineage):
the size and sha256 of the model and its `.data` file, the export's options, the parity numbers
and, when `source` names the checkpoint or model directory exported, that parent's manifest hash.

Language models (a `config` with max_seq_len and vocab_size, such as perfml's Llama, and integer
token ids [batch, seq] as the first input): the graph's input is named `input_ids` and its
output `logits` [batch, seq, vocab]; the two limits are written to the model's metadata_props
("max_seq_len", "vocab_size") and are checked inside the graph itself, where PyTorch raises:
two Gathers, named `sequence_longer_than_max_seq_len_<N>` and
`input_ids_outside_vocab_size_<V>`, read a table of N rows at the last position and a one-row
table at each (id outside 0..V-1) flag, so onnxruntime fails on a longer sequence or an
out-of-range id (ONNX's Gather would otherwise wrap id -1 to the last row) and names the node.
`OnnxRunner` / `run_onnx` check the same limits before running and raise OnnxInputError.

bfloat16: onnxruntime's CPU provider has no bfloat16 matmul, so verify=True refuses a model with
bfloat16 weights or inputs up front (export model.float(), or model.half(): fp16 runs).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils import _pytree

TOLERANCE = {
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
    torch.float64: 1e-7,
}
EXTERNAL_DATA_THRESHOLD = 2**31  # bytes of weights; protobuf cannot serialize 2 GiB or more
FALLBACK_OPSET = 20  # torch.onnx's default: used when onnxruntime cannot run opset 23
PREFERRED_OPSET = 23  # the first with RMSNormalization (and Attention)
MIN_OPSET = 18  # torch.onnx's translations start at 18
DIM_NAMES = ("batch", "seq")
_PROVIDER = "CPUExecutionProvider"
# op namespaces torch.onnx translates itself; any other op needs an entry in perfml's table
_TORCH_ONNX_NAMESPACES = ("aten", "prims", "onnx", "quantized_decomposed")


class ExportError(RuntimeError):
    """The model cannot be exported as asked; the message names the op, module or input."""


class OnnxInputError(ExportError, ValueError):
    """An input that the exported model cannot take (past max_seq_len, a token id outside the
    vocabulary, a wrong dtype or rank); the message names the limit."""


class ParityError(ExportError):
    """The exported model disagrees with PyTorch beyond the tolerance; `.report` holds the
    numbers and the path of the rejected ONNX file, kept for inspection in the folder
    `<path>.parity-failed` (never at `path`)."""

    def __init__(self, message: str, report: ExportReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class Parity:
    """onnxruntime against PyTorch on fresh inputs."""

    max_abs_err: float
    max_rel_err: float
    tolerance: float
    input_shapes: list[list[int]]
    example_shapes: list[list[int]]
    provider: str = _PROVIDER

    @property
    def ok(self) -> bool:
        return self.max_rel_err <= self.tolerance


@dataclass
class ExportReport:
    path: Path
    opset: int
    external_data: Path | None  # the weights file when they are stored outside the model
    weights_bytes: int
    op_counts: dict[str, int]  # ONNX op type -> nodes in the graph
    perfml_ops: dict[str, int]  # perfml op -> calls translated
    rms_normalization: bool  # whether RMSNormalization could be emitted for fp32 RMSNorms
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    export_s: float
    max_seq_len: int | None = None  # the token limits of a language model (also in metadata)
    vocab_size: int | None = None
    parity: Parity | None = None
    verify_s: float | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        size = f"{self.weights_bytes / 2**20:.1f} MiB of weights"
        where = f" in {self.external_data.name}" if self.external_data else ""
        lines = [f"{self.path}: ONNX opset {self.opset}, {size}{where}, {self.export_s:.1f} s"]
        axes = ", ".join(
            f"{name}[{axis}]={dim}"
            for name, d in self.dynamic_axes.items()
            for axis, dim in d.items()
        )
        lines.append(f"  dynamic axes: {axes or 'none'}")
        lines.append(
            f"  inputs: {', '.join(self.input_names)}; outputs: {', '.join(self.output_names)}"
        )
        if self.max_seq_len is not None:
            lines.append(
                f"  limits (checked in the graph, in metadata_props): max_seq_len "
                f"{self.max_seq_len}, vocab_size {self.vocab_size}"
            )
        if self.perfml_ops:
            ops = ", ".join(f"{name} x{n}" for name, n in sorted(self.perfml_ops.items()))
            lines.append(f"  perfml ops translated: {ops}")
        top = sorted(self.op_counts.items(), key=lambda kv: (-kv[1], kv[0]))[:8]
        lines.append("  ONNX ops: " + ", ".join(f"{name} {n}" for name, n in top))
        if self.parity is not None:
            p = self.parity
            verdict = "ok" if p.ok else "FAILED"
            lines.append(
                f"  parity vs PyTorch ({p.provider}, inputs {_shapes_text(p.input_shapes)}; "
                f"example {_shapes_text(p.example_shapes)}): max abs err {p.max_abs_err:.3g}, "
                f"max rel err {p.max_rel_err:.3g} (tolerance {p.tolerance:g}) {verdict}"
            )
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _shapes_text(shapes: list[list[int]]) -> str:
    return ", ".join("x".join(map(str, s)) for s in shapes)


# --- opset and runtime capability ------------------------------------------------------------


@functools.cache
def onnxruntime_runs_rms_normalization() -> bool | None:
    """Whether the installed onnxruntime runs an fp32 RMSNormalization (opset 23) on its CPU
    provider: a one-node model is loaded and run once. None when onnxruntime is not installed."""
    try:
        import onnxruntime
    except ImportError:
        return None
    import numpy as np
    from onnx import TensorProto, helper

    node = helper.make_node("RMSNormalization", ["x", "s"], ["y"], axis=-1, epsilon=1e-6)
    graph = helper.make_graph(
        [node],
        "probe",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, [4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    opsets = [helper.make_opsetid("", PREFERRED_OPSET)]
    # the oldest IR version that can hold this opset: a runtime may not read the newest one
    probe = helper.make_model(graph, opset_imports=opsets)
    probe.ir_version = helper.find_min_ir_version_for(opsets)
    try:
        session = onnxruntime.InferenceSession(probe.SerializeToString(), providers=[_PROVIDER])
        x = np.ones((1, 4), dtype=np.float32)
        session.run(None, {"x": x, "s": np.ones(4, dtype=np.float32)})
    except Exception:  # any failure means "not supported here"; the fallback is exact
        return False
    return True


def resolve_opset(opset: int | None) -> tuple[int, bool]:
    """(the opset to export, whether RMSNormalization may be used). None picks 23 when the
    installed onnxruntime runs it (or none is installed: the standard decides), else 20."""
    import onnx

    runtime = onnxruntime_runs_rms_normalization()
    if opset is None:
        opset = FALLBACK_OPSET if runtime is False else PREFERRED_OPSET
    newest = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise ValueError(f"to_onnx: opset must be an int in {MIN_OPSET}..{newest}, got {opset!r}")
    return opset, opset >= PREFERRED_OPSET and runtime is not False


# --- capture ---------------------------------------------------------------------------------


def _as_tuple(example_inputs: Any) -> tuple[Tensor, ...]:
    args = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    for i, a in enumerate(args):
        if not isinstance(a, Tensor):
            raise TypeError(
                f"to_onnx: example_inputs[{i}] must be a Tensor, got {type(a).__name__} "
                "(non-tensor arguments would be frozen into the graph; bind them in a wrapper "
                "module instead)"
            )
    return tuple(args)


def _dynamic_shapes(
    args: tuple[Tensor, ...], dynamic_batch: bool, dynamic_seq: bool
) -> tuple[dict[int, str], ...]:
    """{axis: name} per input: dim 0 "batch", dim 1 "seq". An input of size 1 along a dim where
    another input is larger broadcasts there (cos/sin tables of shape [1, T, D]) and stays
    static; an example of size 1 everywhere is an error (torch.export would freeze it)."""
    shapes: list[dict[int, str]] = [{} for _ in args]
    for axis, (name, on) in enumerate(zip(DIM_NAMES, (dynamic_batch, dynamic_seq), strict=True)):
        having = [i for i, a in enumerate(args) if on and a.dim() > axis]
        if not having:
            continue
        if all(args[i].shape[axis] < 2 for i in having):
            flag = "dynamic_batch" if axis == 0 else "dynamic_seq"
            raise ValueError(
                f"to_onnx: example_inputs[{having[0]}] has size {args[having[0]].shape[axis]} "
                f"along the dynamic '{name}' dim {axis}; torch.export turns size-0/1 dims into "
                f"constants, so give an example of size 2 or more there (or {flag}=False)"
            )
        for i in having:
            if args[i].shape[axis] >= 2:
                shapes[i][axis] = name
    return tuple(shapes)


def _capture(
    model: nn.Module, args: tuple[Tensor, ...], dynamic: tuple[dict[int, str], ...]
) -> torch.export.ExportedProgram:
    dims = tuple({axis: torch.export.Dim.DYNAMIC for axis in axes} for axes in dynamic)
    try:
        return torch.export.export(model, args, dynamic_shapes=dims, strict=False)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        message = f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: "
        message += first
        if "Constraints violated" in first:
            marked = ", ".join(
                f"example_inputs[{i}] dim {axis} ('{name}')"
                for i, axes in enumerate(dynamic)
                for axis, name in axes.items()
            )
            message += (
                f"; the model fixes a dim marked dynamic ({marked}): pass dynamic_batch=False "
                "or dynamic_seq=False for it"
            )
        raise ExportError(message) from exc


def _op_name(target: Any) -> str:
    return f"{target.namespace}::{target._opname}"


def _module_of(node: torch.fx.Node, model: nn.Module) -> str:
    """'layers.0.mlp (perfml.nn.swiglu.SwiGLUMLP)' for the innermost module around `node`."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return f"the forward of {type(model).__name__}"
    path, kind = list(stack.values())[-1]
    kind = kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}"
    return f"module '{path or '<root>'}' ({kind})"


def _check_ops(
    ep: torch.export.ExportedProgram, table: dict[Any, Any], model: nn.Module
) -> dict[str, int]:
    """Every non-ATen op of the program must have a translation; returns the perfml op counts."""
    from perfml.export.translations import TRAINING_ONLY_OPS

    counts: Counter[str] = Counter()
    for node in ep.graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        if target.namespace in _TORCH_ONNX_NAMESPACES:
            continue
        name = _op_name(target)
        if target in table:
            counts[name] += 1
            continue
        where = _module_of(node, model)
        if name in TRAINING_ONLY_OPS:
            raise ExportError(
                f"{name}, called from {where}, is a training-only loss op with no ONNX "
                "translation; export the logits path instead (call the model without labels, "
                "or wrap it in a module that returns the logits)"
            )
        raise ExportError(
            f"{name}, called from {where}, has no ONNX translation (perfml translates: "
            f"{', '.join(sorted(_op_name(t) for t in table))})"
        )
    return dict(counts)


def _bare(name: str) -> str:
    """'aten::_linalg_eigh' -> 'aten::linalg_eigh': decompositions often call an op's private
    twin, so a failing op is matched to the module that called its public form."""
    namespace, _, op = name.partition("::")
    return f"{namespace}::{op.lstrip('_')}"


def _conversion_error(
    exc: Exception, ep: torch.export.ExportedProgram, model: nn.Module, opset: int
) -> str:
    """A one-line reason for a failed torch.onnx conversion: the op with no translation and the
    module that called it, or else the root cause from the exporter's exception summary."""
    text = str(exc)
    match = re.search(r"No ONNX function found for <OpOverload\(op='([\w.]+)'", text)
    if match is None:
        causes = re.findall(r"^<class '[\w.]+'>: (.+)$", text, flags=re.MULTILINE)
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        return (
            f"torch.onnx could not convert {type(model).__name__}: {causes[0] if causes else first}"
        )
    qualified = match.group(1).replace(".", "::", 1)
    where = next(
        (
            _module_of(node, model)
            for node in ep.graph.nodes
            if isinstance(node.target, torch._ops.OpOverload)
            and _bare(_op_name(node.target)) == _bare(qualified)
        ),
        f"the forward of {type(model).__name__}",
    )
    return f"{qualified}, called from {where}, has no ONNX translation at opset {opset}"


# --- verification ----------------------------------------------------------------------------


def _fresh_sizes(ep: torch.export.ExportedProgram) -> dict[Any, int]:
    """{symbol: a size different from the example's} inside torch.export's proven range."""
    sizes: dict[Any, int] = {}
    user_inputs = set(ep.graph_signature.user_inputs)
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in user_inputs:
            continue
        for dim in node.meta["val"].shape:
            if not isinstance(dim, torch.SymInt):
                continue
            expr = dim.node.expr
            if expr in sizes or expr not in ep.range_constraints:
                continue
            example = dim.node.hint
            bounds = ep.range_constraints[expr]
            lower, upper = max(int(bounds.lower), 2), bounds.upper
            up = example + 1
            sizes[expr] = up if up <= upper else max(example - 1, lower)
    return sizes


def _fresh_like(t: Tensor, shape: list[int], generator: torch.Generator) -> Tensor:
    """A new random tensor of `shape` with the example's dtype, device and value range."""
    if t.dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool().to(t.device)
    if not t.is_floating_point():
        lo, hi = int(t.min()), int(t.max())
        return torch.randint(lo, hi + 1, shape, generator=generator, dtype=t.dtype).to(t.device)
    std = float(t.float().std()) if t.numel() > 1 else 1.0
    mean = float(t.float().mean())
    x = torch.randn(shape, generator=generator) * (std or 1.0) + mean
    return x.to(device=t.device, dtype=t.dtype)


def _fresh_inputs(ep: torch.export.ExportedProgram, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    sizes = _fresh_sizes(ep)
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    generator = torch.Generator().manual_seed(1234)
    fresh = []
    for name, example in zip(ep.graph_signature.user_inputs, args, strict=True):
        shape = [
            sizes.get(d.node.expr, d.node.hint) if isinstance(d, torch.SymInt) else int(d)
            for d in placeholders[name].meta["val"].shape
        ]
        fresh.append(_fresh_like(example, shape, generator))
    return tuple(fresh)


def _numpy(t: Tensor) -> Any:
    if t.dtype == torch.bfloat16:
        raise ExportError(
            "verify: onnxruntime takes numpy arrays and numpy has no bfloat16; verify an fp32 "
            "copy of the model (model.float()) or pass verify=False"
        )
    return t.detach().cpu().numpy()


def _compare(got: list[Any], want: list[Tensor]) -> tuple[float, float, float]:
    """(max abs err, max rel err, tolerance) over all outputs, the worst of each."""
    if len(got) != len(want):
        raise ExportError(f"verify: the ONNX model has {len(got)} outputs, PyTorch {len(want)}")
    worst_abs, worst_rel, tolerance = 0.0, 0.0, 0.0
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        g = torch.from_numpy(g)
        if tuple(g.shape) != tuple(w.shape):
            raise ExportError(
                f"verify: output {i} has shape {tuple(g.shape)} in ONNX, {tuple(w.shape)} in "
                "PyTorch"
            )
        w = w.detach().cpu()
        tol = TOLERANCE.get(w.dtype, 0.0) if w.is_floating_point() else 0.0
        tolerance = max(tolerance, tol)
        diff = (g.double() - w.double()).abs()
        err = float(diff.max()) if diff.numel() else 0.0
        if diff.isnan().any():
            err = float("inf")
        scale = float(w.double().abs().max()) if w.numel() else 0.0
        worst_abs = max(worst_abs, err)
        worst_rel = max(worst_rel, err / scale if scale > 0 else err)
    return worst_abs, worst_rel, tolerance


def _session(onnxruntime: Any, path: Path, exact: bool) -> Any:
    options = onnxruntime.SessionOptions()
    if exact:
        # onnxruntime fuses DequantizeLinear -> MatMul into MatMulNBits and by default computes
        # it on int8-quantized activations (accuracy level 4); level 1 keeps fp32 activations
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return onnxruntime.InferenceSession(str(path), options, providers=[_PROVIDER])


def _import_onnxruntime(what: str) -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise ExportError(
            f"{what} needs onnxruntime (pip install 'perfml[export]')"
            + (", or pass verify=False" if what == "verify=True" else "")
        ) from exc
    return onnxruntime


class OnnxRunner:
    """An exported model in onnxruntime's CPU provider, with the input checks PyTorch makes.

    runner = OnnxRunner("model.onnx"); (logits,) = runner(input_ids)   # numpy or torch input
    The inputs go positionally (graph order) or by name; the outputs come back as numpy arrays
    in graph order. For a language model export (metadata_props max_seq_len / vocab_size) the
    token ids (`input_ids`) must be an integer array [batch, seq] with seq <= max_seq_len and
    every id in 0..vocab_size-1; anything else raises OnnxInputError naming the limit, before
    onnxruntime runs. exact=True (the default) keeps fp32 activations in the QDQ matmuls that
    onnxruntime fuses into MatMulNBits (session.qdq_matmulnbits_accuracy_level=1).
    """

    def __init__(self, path: str | Path, *, exact: bool = True) -> None:
        onnxruntime = _import_onnxruntime("OnnxRunner")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"OnnxRunner: no ONNX model at {self.path}")
        self.session = _session(onnxruntime, self.path, exact)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        props = self.session.get_modelmeta().custom_metadata_map
        self.max_seq_len = _int_prop(props, "max_seq_len", self.path)
        self.vocab_size = _int_prop(props, "vocab_size", self.path)

    def _feeds(self, inputs: tuple[Any, ...], named: dict[str, Any]) -> dict[str, Any]:
        if len(inputs) > len(self.input_names):
            raise OnnxInputError(
                f"{self.path.name} takes {len(self.input_names)} input"
                f"{'s' if len(self.input_names) != 1 else ''} ({', '.join(self.input_names)}), "
                f"got {len(inputs)}"
            )
        feeds = dict(zip(self.input_names, inputs, strict=False))
        for name, value in named.items():
            if name not in self.input_names:
                raise OnnxInputError(
                    f"{self.path.name} has no input {name!r}; its inputs: "
                    f"{', '.join(self.input_names)}"
                )
            if name in feeds:
                raise OnnxInputError(f"{self.path.name}: input {name!r} given twice")
            feeds[name] = value
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise OnnxInputError(f"{self.path.name}: missing input {', '.join(missing)}")
        return {name: _as_numpy(name, value) for name, value in feeds.items()}

    def check_tokens(self, ids: Any) -> None:
        """Raise OnnxInputError unless `ids` fits the model's max_seq_len and vocab_size."""
        import numpy as np

        name = TOKEN_INPUT
        if not isinstance(ids, np.ndarray) or ids.ndim != 2 or ids.dtype.kind not in "iu":
            shape = tuple(getattr(ids, "shape", ()))
            raise OnnxInputError(
                f"{self.path.name}: {name} must be an integer array [batch, seq], got "
                f"{getattr(ids, 'dtype', type(ids).__name__)} {shape}"
            )
        if self.max_seq_len is not None and ids.shape[1] > self.max_seq_len:
            raise OnnxInputError(
                f"{self.path.name}: {name} has {ids.shape[1]} tokens; the model was exported "
                f"with max_seq_len {self.max_seq_len}"
            )
        if self.vocab_size is not None and ids.size:
            low, high = int(ids.min()), int(ids.max())
            bad = low if low < 0 else high if high >= self.vocab_size else None
            if bad is not None:
                raise OnnxInputError(
                    f"{self.path.name}: {name} holds token id {bad}; the vocabulary is "
                    f"0..{self.vocab_size - 1} (vocab_size {self.vocab_size})"
                )

    def __call__(self, *inputs: Any, **named: Any) -> list[Any]:
        feeds = self._feeds(inputs, named)
        if (self.max_seq_len is not None or self.vocab_size is not None) and feeds:
            self.check_tokens(feeds.get(TOKEN_INPUT, next(iter(feeds.values()))))
        return self.session.run(None, feeds)


def run_onnx(path: str | Path, *inputs: Any, exact: bool = True, **named: Any) -> list[Any]:
    """`OnnxRunner(path, exact=exact)(*inputs, **named)`: one run of an exported model in
    onnxruntime with perfml's input checks (see OnnxRunner)."""
    return OnnxRunner(path, exact=exact)(*inputs, **named)


def _int_prop(props: dict[str, str], key: str, path: Path) -> int | None:
    if key not in props:
        return None
    try:
        return int(props[key])
    except ValueError:
        raise ExportError(
            f"{path}: metadata_props {key} must be an integer, got {props[key]!r}"
        ) from None


def _as_numpy(name: str, value: Any) -> Any:
    import numpy as np

    if isinstance(value, Tensor):
        if value.dtype == torch.bfloat16:
            raise OnnxInputError(f"{name}: numpy, which onnxruntime takes, has no bfloat16")
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _run_onnx(onnxruntime: Any, path: Path, feeds: list[Any], exact: bool) -> list[Any]:
    try:
        runner = OnnxRunner(path, exact=exact)
    except Exception as exc:
        raise ExportError(
            f"verify: onnxruntime {onnxruntime.__version__} could not load {path.name}: "
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
        ) from exc
    try:
        return runner(*feeds)
    except OnnxInputError:
        raise
    except Exception as exc:
        raise ExportError(
            f"verify: onnxruntime {onnxruntime.__version__} could not run {path.name}: "
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
        ) from exc


def _verify(
    model: nn.Module,
    ep: torch.export.ExportedProgram,
    args: tuple[Tensor, ...],
    report: ExportReport,
    model_file: Path,
) -> Parity:
    onnxruntime = _import_onnxruntime("verify=True")
    fresh = _fresh_inputs(ep, args)
    feeds = [_numpy(t) for t in fresh]
    with torch.no_grad():
        want = [t for t in _pytree.tree_leaves(model(*fresh)) if isinstance(t, Tensor)]
    got = _run_onnx(onnxruntime, model_file, feeds, exact=True)
    max_abs, max_rel, tolerance = _compare(got, want)
    if "DequantizeLinear" in report.op_counts:
        _, default_rel, _ = _compare(_run_onnx(onnxruntime, model_file, feeds, False), want)
        report.notes.append(
            f"onnxruntime's default session runs the QDQ matmuls as MatMulNBits on int8 "
            f"activations: max rel err {default_rel:.3g} there; session config "
            "session.qdq_matmulnbits_accuracy_level=1 keeps fp32 activations (the parity above)"
        )
    return Parity(
        max_abs_err=max_abs,
        max_rel_err=max_rel,
        tolerance=tolerance,
        input_shapes=[list(t.shape) for t in fresh],
        example_shapes=[list(t.shape) for t in args],
    )


# --- language-model limits -------------------------------------------------------------------

TOKEN_INPUT = "input_ids"  # the graph input of a language model export
LOGITS_OUTPUT = "logits"  # and its output
_SEQ_CHECK = "_perfml_max_seq_len_check"  # [max_seq_len] zeros: row t - 1 exists iff t fits
_VOCAB_CHECK = "_perfml_vocab_size_check"  # [1, 1] zeros: row 1 (a bad id's flag) does not


def _token_limits(
    model: nn.Module,
    args: tuple[Tensor, ...],
    max_seq_len: int | None,
    vocab_size: int | None,
) -> tuple[int, int] | None:
    """(max_seq_len, vocab_size) of a language model taking token ids [B, T] first: the
    arguments, else `model.config`'s; None for any other model."""
    config = getattr(model, "config", None)
    given = max_seq_len is not None or vocab_size is not None
    if max_seq_len is None:
        max_seq_len = getattr(config, "max_seq_len", None)
    if vocab_size is None:
        vocab_size = getattr(config, "vocab_size", None)
    ids = args[0] if args else None
    is_ids = ids is not None and ids.dim() == 2 and not ids.is_floating_point()
    is_ids = is_ids and not ids.is_complex() and ids.dtype != torch.bool
    if given and not is_ids:
        raise ValueError(
            "to_onnx: max_seq_len / vocab_size describe token ids, so example_inputs[0] must be "
            f"an integer tensor [batch, seq], got {ids.dtype if ids is not None else None} "
            f"{tuple(ids.shape) if ids is not None else ()}"
        )
    if not is_ids or max_seq_len is None or vocab_size is None:
        return None
    for name, value in (("max_seq_len", max_seq_len), ("vocab_size", vocab_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"to_onnx: {name} must be a positive int, got {value!r}")
    if ids.shape[1] > max_seq_len:
        raise ValueError(
            f"to_onnx: example_inputs[0] has {ids.shape[1]} tokens, over max_seq_len {max_seq_len}"
        )
    return max_seq_len, vocab_size


@contextlib.contextmanager
def _token_checks(model: nn.Module, limits: tuple[int, int]) -> Iterator[None]:
    """While exporting, a forward pre-hook routes the token ids through the two checks that
    make onnxruntime fail where PyTorch raises (see the module docstring); their tables are
    buffers of the model for that time only."""
    max_seq_len, vocab_size = limits
    device = next((t.device for t in model.buffers()), None)
    device = next((t.device for t in model.parameters()), device)
    seq_check = torch.zeros(max_seq_len, dtype=torch.int64, device=device)
    vocab_check = torch.zeros(1, 1, dtype=torch.int64, device=device)

    def check(module: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        ids, *rest = inputs
        outside = (ids < 0) | (ids >= vocab_size)
        zero = F.embedding(outside.long(), getattr(module, _VOCAB_CHECK)).squeeze(-1)
        zero = zero + getattr(module, _SEQ_CHECK)[ids.shape[1] - 1]
        return (ids + zero.to(ids.dtype), *rest)

    model.register_buffer(_SEQ_CHECK, seq_check, persistent=False)
    model.register_buffer(_VOCAB_CHECK, vocab_check, persistent=False)
    handle = model.register_forward_pre_hook(check)
    try:
        yield
    finally:
        handle.remove()
        del model._buffers[_SEQ_CHECK], model._buffers[_VOCAB_CHECK]


def _name_token_checks(model: Any, limits: tuple[int, int]) -> None:
    """Give the checks' Gather nodes names that say the limit: onnxruntime's error names the
    node that failed. A check folded away (a static sequence length) has no node."""
    max_seq_len, vocab_size = limits
    names = {
        _SEQ_CHECK: f"sequence_longer_than_max_seq_len_{max_seq_len}",
        _VOCAB_CHECK: f"input_ids_outside_vocab_size_{vocab_size}",
    }
    for node in model.graph.all_nodes():
        source = node.inputs[0] if node.inputs else None
        if node.op_type == "Gather" and source is not None and source.name in names:
            node.name = names[source.name]
            source.name = names[source.name] + "_table"


def _bfloat16_tensor(model: nn.Module, args: tuple[Tensor, ...]) -> str | None:
    """The name of the first bfloat16 parameter, buffer or input, if any."""
    for name, t in model.named_parameters():
        if t.dtype == torch.bfloat16:
            return name
    for name, t in model.named_buffers():
        if t.dtype == torch.bfloat16:
            return name
    return next(
        (f"example_inputs[{i}]" for i, a in enumerate(args) if a.dtype == torch.bfloat16), None
    )


# --- output noise ----------------------------------------------------------------------------

# what torch.onnx / torch.export print on every export and that says nothing about this model
_NOISE_WARNINGS = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    (UserWarning, r"# The axis name: .* will not be used, since it shares the same shape"),
)
_NOISE_LOGS = (("torch.onnx._internal.exporter._registration", "torchvision is not installed"),)


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the known torch.onnx / torch.export warnings and log lines around the export
    call only; every other warning and every error passes."""
    filters = []
    for name, prefix in _NOISE_LOGS:
        log_filter = _DropMessages(prefix)
        logging.getLogger(name).addFilter(log_filter)
        filters.append((name, log_filter))
    try:
        with warnings.catch_warnings():
            for category, message in _NOISE_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        for name, log_filter in filters:
            logging.getLogger(name).removeFilter(log_filter)


# --- the entry point -------------------------------------------------------------------------


def _count_ops(model: Any) -> dict[str, int]:
    counts: Counter[str] = Counter(node.op_type for node in model.graph.all_nodes())
    return dict(counts)


def _name_io(
    graph: Any,
    input_names: Sequence[str] | None,
    output_names: Sequence[str] | None,
    language_model: bool,
) -> None:
    """Rename the graph's inputs and outputs: the names given, else `input_ids` / `logits` for
    a language model (its first input, its one output); other names stay torch.onnx's."""
    for values, names, what in (
        (graph.inputs, input_names, "input_names"),
        (graph.outputs, output_names, "output_names"),
    ):
        if names is None:
            continue
        names = list(names)
        if len(names) != len(values) or len(set(names)) != len(names):
            raise ValueError(
                f"to_onnx: {what} must be {len(values)} distinct names (one per graph "
                f"{what.split('_')[0]}), got {names!r}"
            )
        if not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"to_onnx: {what} must be non-empty strings, got {names!r}")
    taken = {v.name for v in graph.inputs} | {v.name for v in graph.outputs}
    taken |= set(graph.initializers)
    if input_names is None and language_model and graph.inputs:
        input_names = [TOKEN_INPUT, *(v.name for v in list(graph.inputs)[1:])]
    if output_names is None and language_model and len(graph.outputs) == 1:
        output_names = [LOGITS_OUTPUT]
    for values, names in ((graph.inputs, input_names), (graph.outputs, output_names)):
        for value, name in zip(values, names or [], strict=False):
            if value.name == name:
                continue
            if name in taken:
                raise ValueError(f"to_onnx: the name {name!r} is already used in the graph")
            taken.discard(value.name)
            value.name = name
            taken.add(name)


def _move_into_place(folder: Path, path: Path, external: bool) -> None:
    """The verified files of `folder` replace `path` (and `<path>.data`): the data first, so the
    model never points at a missing or older weights file."""
    if external:
        os.replace(folder / (path.name + ".data"), path.with_name(path.name + ".data"))
    os.replace(folder / path.name, path)


def _keep_rejected(folder: Path, path: Path) -> Path:
    """Move a model that failed the parity check to `<path>.parity-failed/` for inspection."""
    kept = path.with_name(path.name + ".parity-failed")
    if kept.is_dir():
        shutil.rmtree(kept)
    elif kept.exists():
        kept.unlink()
    os.replace(folder, kept)
    return kept / path.name


def to_onnx(
    model: nn.Module,
    example_inputs: Tensor | tuple[Tensor, ...],
    path: str | Path,
    *,
    dynamic_batch: bool = True,
    dynamic_seq: bool = True,
    verify: bool = True,
    opset: int | None = None,
    max_seq_len: int | None = None,
    vocab_size: int | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    source: str | Path | None = None,
) -> ExportReport:
    """Export `model` (evaluated on `example_inputs`, positional tensors) to the ONNX file `path`.

    dynamic_batch / dynamic_seq make dim 0 / dim 1 of every input symbolic ("batch", "seq").
    opset None picks 23 when the installed onnxruntime runs it, else 20. The model is exported
    in eval mode (its training flag is restored afterwards). verify=True checks onnxruntime
    against PyTorch on fresh inputs of another batch and sequence length and raises ParityError
    above TOLERANCE (see the module docstring). Raises ExportError naming the op and module for
    anything that has no ONNX form, and up front for bfloat16 with verify=True (onnxruntime's
    CPU provider cannot run it: export model.float() or model.half()).

    Names. A language model (example_inputs[0] integer token ids [batch, seq] and max_seq_len
    / vocab_size given or read from `model.config`, as for perfml's Llama) has the graph input
    `input_ids` [batch, seq] (int64) and the output `logits` [batch, seq, vocab_size]; its two
    limits go into the model's metadata_props ("max_seq_len", "vocab_size") and are checked
    inside the graph (onnxruntime fails on a longer sequence or a token id outside
    0..vocab_size-1, naming the limit in the failing node's name), and OnnxRunner / run_onnx
    check them before running. Other models keep the forward's argument names as input names
    and torch.onnx's output names; input_names / output_names override either.

    The file appears at `path` only after everything (the verification included) succeeded: a
    failure leaves no file and an earlier model at `path` untouched; a model that fails the
    parity check is kept for inspection in `<path>.parity-failed/`. Then the manifest
    `<path>.manifest.json` is written, naming `source` (the directory the model came from) as
    its parent.
    """
    from torch.onnx import export as onnx_export

    from perfml.export.translations import build_table

    if not isinstance(model, nn.Module):
        raise TypeError(f"to_onnx: model must be an nn.Module, got {type(model).__name__}")
    args = _as_tuple(example_inputs)
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"to_onnx: path {path} is a directory; give the .onnx file to write")
    bf16 = _bfloat16_tensor(model, args)
    if verify and bf16 is not None:
        raise ExportError(
            f"to_onnx: {type(model).__name__} holds bfloat16 tensors (first: {bf16}) and "
            "onnxruntime's CPU provider, which verify=True runs, has no bfloat16 kernels; export "
            "model.float() (or model.half(): fp16 runs), or pass verify=False to write an "
            "unverified bfloat16 graph for a runtime that runs it"
        )
    opset, rms_normalization = resolve_opset(opset)
    limits = _token_limits(model, args, max_seq_len, vocab_size)
    dynamic = _dynamic_shapes(args, dynamic_batch, dynamic_seq)
    table = build_table(opset, rms_normalization)
    was_training = model.training
    model.eval()
    folder: Path | None = None
    try:
        start = time.perf_counter()
        with _quiet():
            with _token_checks(model, limits) if limits else contextlib.nullcontext():
                ep = _capture(model, args, dynamic)
            perfml_ops = _check_ops(ep, table, model)
            try:
                program = onnx_export(
                    ep,
                    args,
                    dynamic_shapes=dynamic,
                    custom_translation_table=table,
                    opset_version=opset,
                    optimize=False,
                    verbose=False,
                )
            except Exception as exc:
                raise ExportError(_conversion_error(exc, ep, model, opset)) from exc
            import onnxscript.optimizer

            onnxscript.optimizer.optimize(program.model)
        _name_io(program.model.graph, input_names, output_names, limits is not None)
        if limits:
            _name_token_checks(program.model, limits)
            program.model.metadata_props["max_seq_len"] = str(limits[0])
            program.model.metadata_props["vocab_size"] = str(limits[1])
        weights = sum(v.const_value.nbytes for v in program.model.graph.initializers.values())
        external = weights >= EXTERNAL_DATA_THRESHOLD
        path.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
        program.save(folder / path.name, external_data=external)
        graph = program.model.graph
        report = ExportReport(
            path=path,
            opset=opset,
            external_data=path.with_name(path.name + ".data") if external else None,
            weights_bytes=weights,
            op_counts=_count_ops(program.model),
            perfml_ops=perfml_ops,
            rms_normalization=rms_normalization,
            input_names=[v.name for v in graph.inputs],
            output_names=[v.name for v in graph.outputs],
            dynamic_axes={
                v.name: {i: str(d.value) for i, d in enumerate(v.shape) if not isinstance(d, int)}
                for v in graph.inputs
                if v.shape is not None and any(not isinstance(d, int) for d in v.shape)
            },
            export_s=time.perf_counter() - start,
            max_seq_len=limits[0] if limits else None,
            vocab_size=limits[1] if limits else None,
        )
        if bf16 is not None:
            report.notes.append(
                f"unverified: bfloat16 ({bf16}); onnxruntime's CPU provider cannot run this graph"
            )
        if verify:
            start = time.perf_counter()
            report.parity = _verify(model, ep, args, report, folder / path.name)
            report.verify_s = time.perf_counter() - start
            if not report.parity.ok:
                report.path = _keep_rejected(folder, path)
                report.external_data = None
                folder = None
                p = report.parity
                raise ParityError(
                    f"ONNX parity check failed for {type(model).__name__}: max rel err "
                    f"{p.max_rel_err:.3g} > tolerance {p.tolerance:g} (max abs err "
                    f"{p.max_abs_err:.3g}) on fresh inputs {_shapes_text(p.input_shapes)} "
                    f"(example {_shapes_text(p.example_shapes)}); nothing was written to {path}, "
                    f"the rejected model is kept at {report.path}",
                    report,
                )
        _move_into_place(folder, path, external)
        _write_manifest(report, source)
    finally:
        model.train(was_training)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    return report


def _write_manifest(report: ExportReport, source: str | Path | None) -> None:
    from perfml import lineage

    path = report.path
    files = [path.name] + ([report.external_data.name] if report.external_data else [])
    parity = report.parity
    manifest = lineage.build(
        lineage.ONNX,
        path.parent,
        files,
        producer={
            "step": "export",
            "format": "onnx",
            "opset": report.opset,
            "input_names": report.input_names,
            "output_names": report.output_names,
            "dynamic_axes": {
                k: {str(a): d for a, d in v.items()} for k, v in report.dynamic_axes.items()
            },
            "verified": parity is not None,
        },
        parent=lineage.parent_record(source),
        metrics={}
        if parity is None
        else {"max_abs_err": parity.max_abs_err, "max_rel_err": parity.max_rel_err},
    )
    lineage.write(path, manifest)


# --- `perfml export RUN_DIR` -----------------------------------------------------------------


def load_model(path: str | Path, checkpoint: str = "latest") -> nn.Module:
    """The Llama behind `path`: a model directory written by `perfml quantize` / `perfml prune`
    (its passes replayed, so an Int8 weight-only model exports as QDQ), or a `perfml train` run
    directory (its "latest" or "best" checkpoint, or the checkpoint directory given)."""
    from perfml import runs

    return runs.load_model(path, checkpoint).model


def export_run(
    path: str | Path,
    out: str | Path,
    *,
    checkpoint: str = "latest",
    batch: int = 2,
    seq: int = 16,
    verify: bool = True,
    opset: int | None = None,
) -> ExportReport:
    """Export the model of a run or model directory (see load_model) with token ids
    [batch, seq] as the example (dynamic batch and sequence); the output is the logits
    [batch, seq, vocab]."""
    model = load_model(path, checkpoint)
    config = model.config
    if not 2 <= seq <= config.max_seq_len or batch < 2:
        raise ValueError(
            f"export: the example needs batch >= 2 and 2 <= seq <= max_seq_len "
            f"({config.max_seq_len}), got batch {batch}, seq {seq}"
        )
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=generator)
    return to_onnx(model, (ids,), out, verify=verify, opset=opset, source=_parent(path, checkpoint))


def _parent(path: str | Path, checkpoint: str) -> Path:
    """The checkpoint (a run) or the model directory that export_run reads."""
    from perfml import runs

    if runs.kind_of(path) == runs.MODEL_DIR:
        return Path(path)
    return runs._resolve(Path(path), checkpoint)[1]
