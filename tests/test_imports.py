"""The packages' import graph has no loops, counting imports inside functions too (a loop hidden
in a function-level import still ties two modules into one)."""
import ast
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mamba_ssm", "mambakit")


def _modules() -> dict:
    """module name -> file, for every .py file of our packages."""
    found = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imports(path: Path, name: str, modules: dict) -> set:
    """Our modules that `path` imports anywhere in its body (a package's names resolve to the
    submodule when one of that name exists)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in modules and t != name)
    return out


def _cycle(graph: dict):
    """One cycle of the graph as a list of names, or None."""
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = "done"
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_loops():
    modules = _modules()
    graph = {name: _imports(path, name, modules) for name, path in modules.items()}
    # a package's __init__ may re-export its submodules: edges from a package to its own
    # submodules are the normal shape of a package, not a loop between concerns
    for name in graph:
        graph[name] = {m for m in graph[name] if not m.startswith(name + ".")}
    cycle = _cycle(graph)
    assert cycle is None, "import loop: " + " -> ".join(cycle)


def test_every_module_imports():
    """Each module imports, in one fresh interpreter, deepest modules first (a module that works only
    after its package's __init__ has run another one first fails here). Modules that exist to use
    an optional package (triton, lm_eval) are left out where it is not installed."""
    import importlib.util
    import subprocess
    import sys

    names = []
    for name, path in _modules().items():
        tree = ast.parse(path.read_text())
        top = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
        top |= {(n.module or "").split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom)}
        if all(importlib.util.find_spec(opt) is not None for opt in ({"triton", "lm_eval"} & top)):
            names.append(name)
    names.sort(key=lambda n: (-n.count("."), n))
    code = "import importlib\nfor n in %r:\n    importlib.import_module(n)\n" % names
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(names) >= 50
