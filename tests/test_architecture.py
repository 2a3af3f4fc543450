"""The layout rules of the package (docs/theory.md §9, "Layout"), checked on the source itself.

* no module imports another module's ``_private`` name (a private *module*'s public names are fine);
* the intra-package import graph has no cycle;
* no source file is over 700 lines, except private kernel modules (file name starting with ``_``);
* the SE loop dispatches on no loss or denoiser class: it only calls the factor contracts.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "amp_attention"
MODULES = sorted(p for p in PKG.rglob("*.py"))


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(path: Path, node: ast.ImportFrom) -> str:
    """Absolute module name of a ``from ... import`` statement."""
    if node.level == 0:
        return node.module or ""
    base = _module_name(path).split(".")
    if path.name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            yield _resolve(path, node), [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def test_no_module_imports_private_names_of_another():
    modules = {_module_name(p) for p in MODULES}
    bad = []
    for path in MODULES:
        for mod, names in _imports(path):
            if not mod.startswith("amp_attention"):
                continue
            for name in names:
                if f"{mod}.{name}" in modules:  # a (private) module itself, not a private name
                    continue
                if name.startswith("_") and not name.startswith("__"):
                    bad.append(f"{_module_name(path)}: from {mod} import {name}")
    assert not bad, bad


def test_import_graph_has_no_cycle():
    names = {_module_name(p): p for p in MODULES}
    graph = {}
    for mod, path in names.items():
        deps = set()
        for target, imported in _imports(path):
            if not target.startswith("amp_attention"):
                continue
            # "from pkg import sub" imports the submodule pkg.sub when it exists
            for n in imported:
                if f"{target}.{n}" in names:
                    deps.add(f"{target}.{n}")
            if target in names:
                deps.add(target)
        deps.discard(mod)
        graph[mod] = deps
    # a package's __init__ importing its own submodules is not a cycle through them
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for dep in graph.get(m, ()):
            if m.startswith(dep + "."):  # a submodule importing its own package's names
                continue
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_source_files_are_small_unless_private_kernel_modules(path):
    if path.name.startswith("_") and path.name != "__init__.py":
        return
    n = len(path.read_text().splitlines())
    assert n <= 700, f"{path.name} has {n} lines"


def test_se_loop_has_no_isinstance_on_factors():
    """The SE calls the factor contracts; it never asks which loss or denoiser it was given."""
    import amp_attention.denoisers as dn
    import amp_attention.losses as ls

    factor_classes = {n for mod in (ls, dn) for n in dir(mod) if isinstance(getattr(mod, n), type)}
    factor_classes |= {"Loss", "OutputFactor", "InputFactor", "BayesSoftmaxOutput", "BayesLinearOutput"}
    tree = ast.parse((PKG / "se.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
            names = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
            assert not names & factor_classes, ast.unparse(node)
