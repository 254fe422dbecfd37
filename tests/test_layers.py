"""README's Layout: "The layers, each importing only from those above it" (maths, ops, connections, models,
scripts), and the library does not import ``kromhc_vision.cli``. Checked on the source's import statements."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kromhc_vision"

MATHS = ("permutations", "residual_maps", "streams")
# what each layer's modules must not import: the layers below it
BELOW = {
    "maths": ("ops", "connections", "recompute", "models", "cli"),
    "ops": ("connections", "models", "cli"),
    "connections": ("models", "cli"),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """Absolute names of the kromhc_vision modules ``path`` imports (relative imports resolved)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            names = [name] + [f"{name}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        yield from (n for n in names if n.startswith("kromhc_vision"))


def _layer_files():
    yield "maths", [PACKAGE / f"{m}.py" for m in MATHS]
    # ops/triton/check.py is `python -m kromhc_vision check-kernels`, a tool that reads the models' widths (README
    # Layout names it); the ops themselves import nothing below them
    yield "ops", sorted(f for f in (PACKAGE / "ops").rglob("*.py") if f != PACKAGE / "ops" / "triton" / "check.py")
    yield "connections", [PACKAGE / "connections.py"]


@pytest.mark.parametrize("layer,files", list(_layer_files()), ids=lambda v: v if isinstance(v, str) else "")
def test_layers_import_only_from_above(layer, files):
    forbidden = tuple(f"kromhc_vision.{m}" for m in BELOW[layer])
    bad = sorted({(f.relative_to(PACKAGE.parent).as_posix(), name) for f in files for name in _imports(f)
                  if name.startswith(forbidden)})
    assert not bad, f"{layer} modules import from a layer below them: {bad}"


def test_library_does_not_import_cli():
    files = [f for f in PACKAGE.rglob("*.py") if "cli" not in f.relative_to(PACKAGE).parts]
    bad = sorted({(f.relative_to(PACKAGE.parent).as_posix(), name) for f in files for name in _imports(f)
                  if name.startswith("kromhc_vision.cli")})
    assert not bad, bad
