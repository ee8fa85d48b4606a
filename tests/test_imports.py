"""What `import perfml` costs and reaches, and the shape of the import graph.

The rules pinned here:
- `import perfml` imports no torch and no optional extra, so the `perfml` command's --help and
  usage errors stay fast; subpackages and top-level functions resolve lazily on first use.
- The subpackages a plain training or inference script uses (ops, nn, optim, models, train, data,
  quant, sparsity) pull in neither torch's compiler (torch._dynamo: seconds of import time) nor an
  optional extra (transformers, onnx, onnxruntime, matplotlib, tensorboard).
- No module of a library package (everything under perfml/ but perfml/cli/ and the
  `python -m perfml` entry point) imports perfml.cli: the arrows run cli -> library.
- No import cycle among perfml's modules at import time, outside the bench case registry
  (perfml/bench/cases registers itself with perfml.bench.registry, which imports the cases).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import perfml
from perfml import _version

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "perfml"

HEAVY = ("torch._dynamo", "transformers", "onnx", "onnxruntime", "matplotlib", "tensorboard")
LAZY_SUBMODULES = (
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
# what each lazy top-level function or class is, by the module that defines it
LAZY_ATTRIBUTES = {
    "patch": "perfml.patch",
    "unpatch": "perfml.patch",
    "PatchReport": "perfml.patch",
    "quantize": "perfml.quant.api",
    "prune": "perfml.sparsity.api",
}
LIGHT_SUBPACKAGES = ("ops", "nn", "optim", "models", "train", "data", "quant", "sparsity")


def _run(code: str) -> dict:
    """Run `code` in a fresh interpreter (from the repository root, as the tests do) and return
    the JSON object it prints last."""
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _loaded(names: tuple[str, ...]) -> str:
    return f"[m for m in {list(names)!r} if m in sys.modules]"


def test_import_perfml_imports_no_torch_and_no_extra():
    got = _run(
        "import json, sys\n"
        "import perfml\n"
        f"print(json.dumps({{'heavy': {_loaded(('torch', *HEAVY))}, "
        "'perfml': sorted(m for m in sys.modules if m.startswith('perfml'))}))"
    )
    assert got["heavy"] == [], f"`import perfml` imported {got['heavy']}"
    assert got["perfml"] == ["perfml"], f"`import perfml` imported {got['perfml']}"


@pytest.mark.parametrize("name", LIGHT_SUBPACKAGES)
def test_light_subpackages_import_no_compiler_and_no_extra(name):
    got = _run(
        f"import json, sys\nimport perfml.{name}\nprint(json.dumps({{'heavy': {_loaded(HEAVY)}}}))"
    )
    assert got["heavy"] == [], f"`import perfml.{name}` imported {got['heavy']}"


def test_lazy_attributes_resolve():
    got = _run(
        "import json, sys, types\n"
        "import perfml\n"
        "out = {}\n"
        f"for name in {list(LAZY_SUBMODULES)!r}:\n"
        "    value = getattr(perfml, name)\n"
        "    out[name] = [isinstance(value, types.ModuleType), value is sys.modules.get(\n"
        "        'perfml.' + name), name in dir(perfml)]\n"
        f"for name in {list(LAZY_ATTRIBUTES)!r}:\n"
        "    value = getattr(perfml, name)\n"
        "    out[name] = [callable(value), value.__module__, name in dir(perfml)]\n"
        "out['to_onnx'] = perfml.export.to_onnx.__module__\n"
        "print(json.dumps(out))"
    )
    for name in LAZY_SUBMODULES:
        assert got[name] == [True, True, True], name
    for name, module in LAZY_ATTRIBUTES.items():
        assert got[name] == [True, module, True], name
    assert got["to_onnx"] == "perfml.export.onnx"


def test_function_patch_is_not_shadowed_by_its_module():
    """Importing the module perfml.patch (as perfml.models and the tests do) leaves the name
    perfml.patch bound to the function, as an eager `from perfml.patch import patch` did."""
    got = _run(
        "import json, sys\n"
        "import perfml\n"
        "import perfml.patch\n"
        "from perfml.patch import patch\n"
        "print(json.dumps([perfml.patch is patch, type(sys.modules['perfml.patch']).__name__]))"
    )
    assert got == [True, "module"]


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="module 'perfml' has no attribute 'no_such_thing'"):
        perfml.no_such_thing  # noqa: B018


def test_version_comes_from_the_installed_metadata():
    assert perfml.__version__ == metadata.version("perfml")
    assert _version._installed_version("perfml-no-such-distribution") == _version.UNKNOWN
    # the one literal is pyproject.toml's: no module of the package spells a version itself
    tomllib = pytest.importorskip("tomllib")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert perfml.__version__ == declared, "installed metadata is stale: reinstall (make install)"
    for path in PACKAGE.rglob("*.py"):
        assert f'"{declared}"' not in path.read_text(), f"{path} spells the version {declared}"


# --- the import graph ------------------------------------------------------------------------


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _targets(module: str, path: Path, node: ast.Import | ast.ImportFrom, known) -> list[str]:
    """The perfml modules an import statement runs: the named module or, for `from X import a`,
    X.a when that is a module (and X itself when some name is not), plus each package above
    them that `module` is not inside (importing a.b.c runs a/__init__ and a/b/__init__ first)."""
    if isinstance(node, ast.Import):
        named = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
            package = package[: len(package) - node.level + 1]
            base = ".".join([*package, base] if base else package)
        named = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
        if len(named) < len(node.names):
            named.append(base)
    out = []
    for name in named:
        if name not in known:
            continue
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            above = ".".join(parts[:i])
            if i == len(parts) or not (module == above or module.startswith(above + ".")):
                out.append(above)
    return out


def _imports(known: dict[str, Path]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """({module: perfml modules it imports when imported}, {module: those it imports anywhere,
    function bodies and `if TYPE_CHECKING:` blocks included})."""
    at_import: dict[str, set[str]] = {m: set() for m in known}
    anywhere: dict[str, set[str]] = {m: set() for m in known}

    def walk(module: str, path: Path, nodes: list[ast.stmt], deferred: bool) -> None:
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets = _targets(module, path, node, known)
                anywhere[module].update(targets)
                if not deferred:
                    at_import[module].update(targets)
            inner = deferred or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                inner = True
            for field in ("body", "orelse", "finalbody", "handlers"):
                children = getattr(node, field, None)
                if isinstance(children, list):
                    walk(module, path, children, inner)

    for module, path in known.items():
        walk(module, path, ast.parse(path.read_text()).body, False)
    return at_import, anywhere


def _cycles(graph: dict[str, set[str]], nodes: set[str]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in nodes:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return found


def _is_cli(module: str) -> bool:
    return module == "perfml.cli" or module.startswith("perfml.cli.")


def test_no_library_module_imports_the_cli():
    known = _modules()
    _, anywhere = _imports(known)
    library = [m for m in known if not _is_cli(m) and m != "perfml.__main__"]
    offenders = sorted(f"{m} -> {t}" for m in library for t in anywhere[m] if _is_cli(t))
    assert offenders == [], "library modules import the CLI:\n" + "\n".join(offenders)


def test_no_import_cycle_outside_the_bench_case_registry():
    known = _modules()
    at_import, anywhere = _imports(known)
    nodes = {m for m in known if not m.startswith("perfml.bench.cases")}
    assert _cycles(at_import, nodes) == []
    # type-only imports (`if TYPE_CHECKING:`) and imports inside functions count too: a module
    # that needs another only lazily still may not be needed back by it
    assert _cycles(anywhere, nodes) == []


def test_cycle_finder_finds_cycles():
    """The checks above can fail: the finder reports a planted cycle and its parse sees
    function-level, type-only and package-init imports."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, {"a", "b", "c", "d"}) == [
        ["a", "b", "c"]
    ]
    known = _modules()
    at_import, anywhere = _imports(known)
    assert "perfml.models.llama" in at_import["perfml.models.decode"]
    # perfml.train.trainer imports perfml.models only inside functions
    assert "perfml.models.llama" in anywhere["perfml.train.trainer"]
    assert "perfml.models.llama" not in at_import["perfml.train.trainer"]
    # importing perfml.train.checkpoint from outside runs perfml/train/__init__.py first
    assert "perfml.train" in at_import["perfml.profile.capture"]
