"""perfml: fused Triton and C++/CUDA kernels for PyTorch training and deployment.

`import perfml` is cheap: it imports neither torch nor any subpackage. Each subpackage
(perfml.ops, perfml.nn, perfml.optim, perfml.models, perfml.train, perfml.data, perfml.quant,
perfml.sparsity, perfml.export, perfml.bench, perfml.profile) and each top-level function
(perfml.patch, perfml.quantize, perfml.prune, ...) is imported on first use through the module
`__getattr__` (PEP 562), so `import perfml; perfml.export.to_onnx(...)` works and a command such as
`perfml --help` pays only for what it uses.
"""

import importlib as _importlib
import sys as _sys
import types as _types

# subpackages reachable as attributes of perfml, imported on first access
_SUBMODULES = (
    "bench",
    "data",
    "export",
    "models",
    "nn",
    "ops",
    "optim",
    "profile",
    "quant",
    "sparsity",
    "train",
)

# top-level names -> the module that defines them
_ATTRIBUTES = {
    "PatchReport": "perfml.patch",
    "patch": "perfml.patch",
    "unpatch": "perfml.patch",
    "quantize": "perfml.quant",
    "prune": "perfml.sparsity",
    "__version__": "perfml._version",
}

__all__ = [
    "nn",
    "ops",
    "optim",
    "patch",
    "unpatch",
    "PatchReport",
    "prune",
    "quantize",
    "__version__",
]


def __getattr__(name: str) -> object:
    if name in _ATTRIBUTES:
        value = getattr(_importlib.import_module(_ATTRIBUTES[name]), name)
    elif name in _SUBMODULES:
        value = _importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups find it without coming back here
    return value


def __dir__() -> list[str]:
    public = {n for n in globals() if not n.startswith("_") or n.startswith("__")}
    return sorted(public | set(_SUBMODULES) | set(_ATTRIBUTES))


class _Package(_types.ModuleType):
    """perfml's module type: `perfml.patch` stays the function after the submodule is imported.

    Importing a submodule binds it on its package (setattr(perfml, "patch", <module>)), which
    would shadow the function perfml.patch with the module perfml/patch.py once anything imports
    that module directly. Such bindings are dropped, so the name resolves through __getattr__ to
    the function; the module itself stays importable as usual (sys.modules["perfml.patch"]).
    """

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, _types.ModuleType) and _ATTRIBUTES.get(name) == f"{__name__}.{name}":
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
