"""The shape of the code: layers import downward only, no import cycles, no module over ~400 lines,
and every module imports on its own in a fresh interpreter (dependencies first)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "prunescope"

LAYERS = {
    1: ["errors", "atomic", "progress", "stats", "batches", "modes", "layer_kinds", "version", "fingerprint", "jsonfile", "checks",
        "python_factory", "outputs"],
    2: ["levels", "metrics", "evaluator", "target", "profile", "plan", "criteria", "identity", "store", "structure.groups", "profile_csv", "schema"],
    3: ["masks", "weight_masks", "structure", "cost", "latency", "oneshot", "incremental", "cell_measure", "cell_runner",
        "targets", "structured", "digits", "scan_checks", "baselines", "curves", "removal", "knapsack"],
    4: ["scan", "search", "plan_check", "execution", "estimate", "allocate", "allocate_knapsack", "apply", "report", "report_text",
        "report_tables", "report_curves", "loading", "export", "shards", "data", "models"],
    5: ["cli", "cli_options", "cli_console", "cli_plan", "runs", "plan_runs", "demo", ""],
}
"""Layer of each module (a package name covers its submodules unless one is listed itself):
1 utilities, 2 data model, 3 mechanics, 4 steps, 5 shells (the package itself re-exports the API)."""

MAX_LINES = 420


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        found[".".join(parts)] = path
    return found


def _layer(module: str) -> int | None:
    best, layer = -1, None
    for number, names in LAYERS.items():
        for name in names:
            if module == name or (name and module.startswith(name + ".")) or name == "" == module:
                if len(name) > best:
                    best, layer = len(name), number
    return layer


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The prunescope modules ``module`` imports, anywhere in the file (lazy imports included)."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    package = [p for p in package if p]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "prunescope":
                target = node.module.partition(".")[2]
            else:
                continue
            for alias in node.names:
                full = f"{target}.{alias.name}" if target else alias.name
                found.add(full if full in modules else target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "prunescope":
                    found.add(alias.name.partition(".")[2])
    return {m for m in found if m in modules and m != module}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in _modules() if _layer(m) is None)
    assert not unplaced, f"give these modules a layer in LAYERS: {unplaced}"


def test_layers_import_downward_only():
    upward = sorted(f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
                    for m, deps in _graph().items() for d in deps if (_layer(d) or 0) > (_layer(m) or 0))
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    graph, cycles, state = _graph(), [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep] if dep in stack else [node, dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    # a package's __init__ re-exporting its own submodules is not a cycle of ideas
    real = [c for c in cycles if not all(c[0].startswith(m) or m.startswith(c[0]) for m in c)]
    assert not real, "\n".join(" -> ".join(c) for c in real)


def test_no_module_is_too_long():
    long = sorted(f"{m}: {n} lines" for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES)
    assert not long, long


def test_every_module_imports_in_dependency_order():
    graph, order, seen = _graph(), [], set()

    def place(node: str) -> None:
        if node in seen:
            return
        seen.add(node)
        for dep in sorted(graph[node]):
            place(dep)
        order.append(node)

    for node in sorted(graph):
        place(node)
    names = [f"prunescope.{m}" if m else "prunescope" for m in order]
    script = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\nprint('ok')"
    result = subprocess.run([sys.executable, "-c", script, *names], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
