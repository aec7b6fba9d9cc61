"""How the code hangs together: the recipe layer needs no torch, and no module imports one that imports it back."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.fast

BLOCK_TORCH = """
import sys
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "peft", "trl", "accelerate", "datasets"):
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Blocked())
"""


def test_recipes_load_without_torch():
    """``import rlhf.config`` and loading every shipped recipe work where torch (and the training libraries)
    cannot be imported: the recipe check reads the method table as plain data."""
    code = BLOCK_TORCH + """
from pathlib import Path
from rlhf.config import load_recipe
from rlhf.errors import UserError
for path in sorted(Path("recipes").glob("*.yaml")):
    try:
        load_recipe(path)
    except UserError as e:  # a recipe naming a hub model or data missing here: checked all the same
        assert "does not exist" in str(e), e
try:
    load_recipe("recipes/tiny.yaml", ["adapter.method=full", "model.quantization=8bit"])
except UserError as e:
    print("refused:", e)
assert "torch" not in sys.modules
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "refused:" in proc.stdout and "cannot be used with adapter.method full" in proc.stdout
    assert proc.stdout.strip().endswith("ok")


def _imports(path: Path, package: str) -> set[str]:
    """The project modules ``path`` imports anywhere (module level or inside functions)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {}
    for root in ("rlhf", "stages"):
        for path in (ROOT / root).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path
    return {name: {m for m in _imports(path, name) if m in modules and m != name and not name.startswith(m + ".")}
            for name, path in modules.items()}


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert "rlhf.config" in graph and "rlhf.models.methods" not in graph["rlhf.config"]


def test_the_graph_sees_imports_inside_functions(tmp_path):
    """The cycle check would catch a lazy import too (a cycle hidden in a function is still a cycle)."""
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from rlhf.models import modeling\n    import rlhf.config\n")
    assert {"rlhf.models.modeling", "rlhf.config"} <= _imports(path, "m")


def test_the_library_never_imports_a_stage():
    """``stages/`` build on ``rlhf/``; only the command (``rlhf.cli``) reaches into a stage, inside its command."""
    graph = import_graph()
    reaching = sorted(m for m, deps in graph.items()
                      if m.startswith("rlhf.") and m != "rlhf.cli" and any(d.startswith("stages") for d in deps))
    assert reaching == []


def test_no_stage_imports_another():
    """Each stage stands on the library alone: what two stages share lives in ``rlhf/``."""
    graph = import_graph()
    crossing = sorted(f"{m} -> {d}" for m, deps in graph.items() if m.startswith("stages.")
                      for d in deps if d.startswith("stages.") and not m.startswith(d) and d != "stages")
    assert crossing == []


def private_reach_ins() -> list[str]:
    """Every use of another project module's private name (``from rlhf.x import _y``, or ``x._y`` where ``x`` is a
    project module), as ``file:line name``."""
    modules = set(import_graph())
    found = []
    for root in ("rlhf", "stages"):
        for path in sorted((ROOT / root).rglob("*.py")):
            tree = ast.parse(path.read_text())
            bound = {}
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    for a in node.names:
                        if f"{node.module}.{a.name}" in modules:
                            bound[a.asname or a.name] = f"{node.module}.{a.name}"
                        elif node.module in modules and a.name.startswith("_"):
                            found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.module}.{a.name}")
                elif isinstance(node, ast.Import):
                    bound.update({a.asname: a.name for a in node.names if a.asname and a.name in modules})
            for node in ast.walk(tree):
                if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                        and node.attr.startswith("_") and not node.attr.startswith("__")):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {bound[node.value.id]}.{node.attr}")
    return found


def test_no_module_reaches_into_another_modules_private_names():
    """A name with a leading underscore is its module's own; another module that needs it needs a public one."""
    assert private_reach_ins() == []


BUDGETS = {"stages": 60, "rlhf": 80}
"""the most lines a function may take (from ``def`` to its last line, docstring included), by folder: a stage's
functions read as a recipe of library calls; the library's may hold more detail"""


def long_functions(root: Path = ROOT) -> list[str]:
    """Every function (methods and nested functions too) over its folder's budget, as ``file:line name lines``."""
    found = []
    for folder, limit in BUDGETS.items():
        for path in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > limit:
                        found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} {lines}")
    return found


def test_every_function_keeps_its_budget():
    """At most 60 lines for a function in ``stages/``, 80 in ``rlhf/``: a longer one is split where it has parts
    (a helper named for what it does), not squeezed."""
    assert long_functions() == []


def _function(name: str, lines: int, indent: str = "") -> str:
    body = "".join(f"{indent}    x{i} = {i}\n" for i in range(lines - 2))
    return f'{indent}def {name}():\n{indent}    """planted"""\n{body}'


def test_the_budget_check_fails_on_a_planted_violation(tmp_path):
    """A function one line over its folder's budget is caught, in either folder, as a method or nested; one at
    the budget is not."""
    (tmp_path / "stages").mkdir()
    (tmp_path / "rlhf" / "inner").mkdir(parents=True)
    (tmp_path / "stages" / "a.py").write_text(_function("at_budget", 60) + "\n\n" + _function("over", 61))
    (tmp_path / "rlhf" / "inner" / "b.py").write_text(
        _function("fine", 80) + "\n\nclass C:\n" + _function("method_over", 81, "    ")
        + "\n\ndef outer():\n" + _function("nested_over", 81, "    ") + "    return nested_over\n")
    found = [line.split(":")[0] + " " + line.split(" ", 1)[1] for line in long_functions(tmp_path)]
    assert sorted(found) == ["rlhf/inner/b.py method_over 81", "rlhf/inner/b.py nested_over 81",
                             "rlhf/inner/b.py outer 83", "stages/a.py over 61"]
