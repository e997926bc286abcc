"""The package layout stays readable: few loose modules, no import cycles, few function-local
imports, one model seam, and configs that load without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dist_lora"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(tree: ast.AST, module: str, modules: dict[str, Path], top_level: bool):
    """(line, imported dist_lora module) of the module-level (or function-local) imports."""
    body = tree.body if top_level else [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    nodes = []
    for node in body:
        if top_level:
            nodes += [node] if isinstance(node, (ast.Import, ast.ImportFrom)) else []
            if isinstance(node, ast.If) and not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                nodes += [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
            if isinstance(node, (ast.With, ast.Try)):
                nodes += [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
        else:
            nodes += [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
    for node in nodes:
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        for name in names:
            if name.split(".")[0] == "dist_lora":
                yield node.lineno, name


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def test_at_most_three_loose_modules_at_the_top():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(loose) <= 3, loose


def test_no_import_cycles_between_modules():
    """Module-level imports of dist_lora modules (a package's ``__init__`` counts: importing a
    module runs its parents first) form no cycle."""
    modules = _modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        for _, target in _imports(tree, name, modules, top_level=True):
            edges[name].update(p for p in _parents(target) if p in modules and p not in _parents(name))
    colour: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if colour.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in colour:
                visit(nxt)
        stack.pop()
        colour[node] = 2

    for node in sorted(edges):
        if node not in colour:
            visit(node)


def test_few_function_local_imports_of_dist_lora():
    modules = _modules()
    local = [f"{path.relative_to(PACKAGE.parent)}:{line} {target}"
             for name, path in modules.items()
             for line, target in _imports(ast.parse(path.read_text()), name, modules, top_level=False)]
    assert len(local) <= 15, "\n".join(local)


def test_only_the_model_seam_asks_whether_a_model_is_a_megatron_model():
    """``model.dist_lora`` is read in models/loading.py (which sets it) and nowhere else; the
    plain-vs-Megatron question goes through dist_lora.adapters.model.view."""
    hits = [str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")
            if '"dist_lora", None' in p.read_text() or "hasattr(model, \"dist_lora\")" in p.read_text()]
    assert hits == ["dist_lora/models/loading.py"], hits


def test_configs_load_without_torch():
    code = ("import sys; from dist_lora.config import LoraConfig, AdaLoraConfig; "
            "LoraConfig(r=4).to_dict(); AdaLoraConfig(total_step=10).to_dict(); "
            "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules), 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=PACKAGE.parent, timeout=120)
    assert result.returncode == 0, result.stderr
