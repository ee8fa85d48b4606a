"""ONNX export of perfml models, checked against PyTorch in onnxruntime.

from perfml.export import to_onnx
report = to_onnx(model, (input_ids,), "model.onnx")   # dynamic batch and sequence, verified
print(report.summary())
"""

from perfml.export.onnx import (
    TOLERANCE,
    ExportError,
    ExportReport,
    Parity,
    ParityError,
    to_onnx,
)

__all__ = ["TOLERANCE", "ExportError", "ExportReport", "Parity", "ParityError", "to_onnx"]
