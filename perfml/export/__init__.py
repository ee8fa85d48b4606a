"""ONNX export of perfml models, checked against PyTorch in onnxruntime.

from perfml.export import run_onnx, to_onnx
report = to_onnx(model, (input_ids,), "model.onnx")   # dynamic batch and sequence, verified
print(report.summary())
(logits,) = run_onnx("model.onnx", input_ids)         # input `input_ids`, output `logits`
"""

from perfml.export.onnx import (
    TOLERANCE,
    ExportError,
    ExportReport,
    OnnxInputError,
    OnnxRunner,
    Parity,
    ParityError,
    run_onnx,
    to_onnx,
)

__all__ = [
    "TOLERANCE",
    "ExportError",
    "ExportReport",
    "OnnxInputError",
    "OnnxRunner",
    "Parity",
    "ParityError",
    "run_onnx",
    "to_onnx",
]
