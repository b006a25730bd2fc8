"""The package's layering: no import cycle between mpqkit modules, counting imports inside
functions too (a lazy import is still a dependency), and ``report`` never reaches back into ``api``."""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "mpqkit"


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(text: str, path: Path, mod: str, modules: set[str]) -> set[str]:
    """mpqkit modules imported anywhere in ``text`` (inside functions too), except under
    ``if TYPE_CHECKING:`` (annotations only)."""
    tree = ast.parse(text)
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = [ast.Pass()]
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # ``from pkg import sub`` needs the submodule; ``from pkg import name`` needs pkg's __init__
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for n in names:
            while n and n not in modules:
                n = n.rpartition(".")[0]
            if n and n != mod:
                out.add(n)
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in SRC.rglob("*.py")}
    return {mod: _imports(path.read_text(), path, mod, set(files)) for mod, path in files.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_no_import_cycle():
    graph = _graph()  # a submodule reading a name from its package's __init__ depends on that __init__ too
    assert _cycle(graph) is None, " → ".join(_cycle(graph) or [])


def test_report_and_engine_do_not_import_upward():
    graph = _graph()
    for mod, deps in graph.items():
        if mod.startswith(("mpqkit.report", "mpqkit.engine", "mpqkit.quant", "mpqkit.solve")):
            assert "mpqkit.api" not in deps and "mpqkit.cli" not in deps, mod
        if mod.startswith("mpqkit.engine"):
            assert not any(d.startswith(("mpqkit.zoo", "mpqkit.plan", "mpqkit.report")) for d in deps), (mod, deps)


def test_functions_fit_a_screen_and_api_stays_a_facade():
    """No function in ``src/`` is over 60 lines (nested ones counted inside their parent too), and
    ``api.py`` (the public facade over the pipeline's stages) stays under 250 lines."""
    long = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 60:
                    long.append(f"{path.relative_to(SRC)}:{node.name} ({n} lines)")
    assert not long, long
    assert len((SRC / "api.py").read_text().splitlines()) <= 250


def test_imports_inside_functions_state_why():
    """Imports sit at module top; one inside a function says why (``# lazy: …`` / ``# optional …``) on its
    line or on the comment and import lines right above it (e.g. torchvision or matplotlib take seconds
    to import, the CLI imports only what its command uses, an optional extra)."""
    missing = []
    for path in sorted(SRC.rglob("*.py")):
        lines = path.read_text().split("\n")
        tree = ast.parse("\n".join(lines))
        parents = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            p = parents.get(node)
            while p is not None and not isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef)):
                p = parents.get(p)
            if p is None:
                continue
            j, said = node.lineno - 1, False
            while j >= 0 and not said:
                text = lines[j].strip()
                said = "# lazy" in text or "# optional" in text
                if j < node.lineno - 1 and not text.startswith(("#", "from ", "import ")) and not text.endswith((",", ")")):
                    break
                j -= 1
            if not said:
                missing.append(f"{path.relative_to(SRC.parent)}:{node.lineno}")
    assert not missing, f"imports inside functions without a stated reason: {missing}"
