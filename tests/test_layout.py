"""The package layout is the architecture: packages by concern, imports only down the layers, few top-level modules.

Every import is read from the source with ``ast`` (including imports inside functions, which hide cycles and
upward dependencies from a plain import check), and each module is placed on its package's layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "braintumor"

# Lowest first. A module may import its own layer or any lower one, never a higher one.
LAYERS = [
    # evaluation.metrics is pure arithmetic (numpy, scikit-learn) that trust fitting and training use too.
    {"braintumor", "braintumor._compat", "braintumor.choices", "braintumor.errors", "braintumor.utils", "braintumor.evaluation.metrics"},
    {"braintumor.data"},
    {"braintumor.synthetic"},
    {"braintumor.models", "braintumor.optim"},
    {"braintumor.trust"},
    {"braintumor.visualize"},
    {"braintumor.inference"},
    {"braintumor.evaluation"},
    {"braintumor.training"},
    {"braintumor.serve"},
    {"braintumor.cli", "braintumor.demo", "braintumor.__main__"},
]
MAX_TOP_LEVEL_MODULES = 8


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    """The layer of a braintumor module: its longest listed prefix."""
    best, best_length = None, -1
    for index, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best_length:
                best, best_length = index, len(name)
    if best is None:
        raise AssertionError(f"{module} is in no layer of tests/test_layout.py: add its package to LAYERS")
    return best


def imports_of(path: Path) -> list[tuple[str, int, bool]]:
    """(imported braintumor module, line, at module level) for every import in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    own = module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # "from braintumor.x import y" may import the submodule y: count it when it is one.
            names = [target]
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                if (PACKAGE.parent / Path(*candidate.split("."))).with_suffix(".py").exists() or \
                        (PACKAGE.parent / Path(*candidate.split("."))).is_dir():
                    names.append(candidate)
        else:
            continue
        for name in names:
            if name == "braintumor" or name.startswith("braintumor."):
                found.append((name, node.lineno, id(node) in top_level))
    return found


def all_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_import_goes_down_the_layers():
    upward = []
    for path in all_modules():
        own = module_name(path)
        for imported, line, _ in imports_of(path):
            if imported == "braintumor":
                continue  # the root package: version, research note, lazy public names
            if layer_of(imported) > layer_of(own):
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} {own} imports {imported}")
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_the_data_layer_never_imports_training():
    offenders = [f"{path.name}: {name}" for path in (PACKAGE / "data").rglob("*.py")
                 for name, _, _ in imports_of(path) if name.startswith("braintumor.training")]
    assert not offenders


@pytest.mark.slow
def test_module_level_imports_have_no_cycle():
    graph: dict[str, set[str]] = {}
    for path in all_modules():
        own = module_name(path)
        graph[own] = {name for name, _, top in imports_of(path) if top and name != own and name != "braintumor"}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if not state.get(nxt):
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if not state.get(node):
            visit(node)


def test_few_modules_at_the_top_level():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


def test_layout_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a data module importing training is reported."""
    fake = tmp_path / "braintumor"
    (fake / "data").mkdir(parents=True)
    (fake / "training").mkdir()
    for init in (fake / "__init__.py", fake / "data" / "__init__.py", fake / "training" / "__init__.py"):
        init.write_text("")
    (fake / "training" / "config.py").write_text("X = 1\n")
    (fake / "data" / "index.py").write_text("def f():\n    from braintumor.training.config import X\n    return X\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    with pytest.raises(AssertionError, match="data.index imports braintumor.training.config"):
        test_every_import_goes_down_the_layers()
