"""The house: qbench's modules import each other without a cycle, layered as DESIGN.md says (graph facts below
quantize/ and analysis/, engines below workflows), and import qbench modules inside functions only where those
pull in a heavy library (torch, ultralytics, neural-compressor, matplotlib) that a light command should not pay for.
Read from the source with `ast`, so it holds for function-local imports too."""

from __future__ import annotations

import ast
from pathlib import Path

QBENCH = Path(__file__).resolve().parents[1] / "qbench"
HEAVY_LIBS = ("torch", "torchvision", "torchao", "ultralytics", "neural_compressor", "matplotlib", "openvino", "nncf")


def _modules() -> dict[str, Path]:
    mods = {}
    for f in QBENCH.rglob("*.py"):
        parts = f.relative_to(QBENCH.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = f
    return mods


MODS = _modules()


def _imports(name: str):
    """(target qbench module or third-party top-level name, inside a function?) of every import in a module."""
    f = MODS[name]
    pkg = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(f.read_text())
    local = {id(n) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(fn)}
    typing_only = {id(n) for b in ast.walk(tree) if isinstance(b, ast.If) and "TYPE_CHECKING" in ast.unparse(b.test)
                   for n in ast.walk(b)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, id(node) in local
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[:len(pkg.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                cand = f"{mod}.{a.name}"
                yield (cand if cand in MODS else mod), id(node) in local


def _graph() -> dict[str, set[str]]:
    """Module -> qbench modules it imports (anywhere), a submodule import counting its packages too (Python runs
    their __init__ first)."""
    edges = {m: set() for m in MODS}
    for m in MODS:
        for target, _ in _imports(m):
            t = target
            while t.startswith("qbench"):
                if t in MODS and t != m and not m.startswith(t + "."):
                    edges[m].add(t)
                t = t.rsplit(".", 1)[0] if "." in t else ""
    return edges


def _heavy() -> set[str]:
    """qbench modules that import a heavy library at module level, directly or through another qbench module."""
    direct = {m for m in MODS for t, local in _imports(m) if not local and t.split(".")[0] in HEAVY_LIBS}
    top = {m: {t for t, local in _imports(m) if not local and t in MODS} for m in MODS}
    heavy = set(direct) | {"qbench.offline"}  # offline: sets ultralytics' environment up (imports matplotlib)
    changed = True
    while changed:
        changed = False
        for m, ts in top.items():
            if m not in heavy and ts & heavy:
                heavy.add(m)
                changed = True
    return heavy


def test_no_import_cycle():
    edges = _graph()
    seen, cycles = set(), []

    def visit(m, path):
        if m in path:
            cycles.append(path[path.index(m):] + [m])
            return
        if m in seen:
            return
        for t in sorted(edges[m]):
            visit(t, path + [m])
        seen.add(m)

    for m in sorted(MODS):
        visit(m, [])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])


def test_layers_import_only_downwards():
    """graph/ imports neither quantize/ nor analysis/; quantize/ never imports analysis/ or a workflow; nothing
    below the CLI imports the CLI."""
    edges = _graph()
    workflows = {"qbench.pipeline", "qbench.comparison", "qbench.mixed", "qbench.bench", "qbench.qatrain", "qbench.cli",
                 "qbench.report"}

    def under(m, pkg):
        return m == pkg or m.startswith(pkg + ".")

    bad = []
    for m, ts in edges.items():
        for t in ts:
            if under(m, "qbench.graph") and (under(t, "qbench.quantization") or under(t, "qbench.analysis")):
                bad.append((m, t))
            if under(m, "qbench.quantization") and (under(t, "qbench.analysis") or any(under(t, w) for w in workflows)):
                bad.append((m, t))
            if t == "qbench.cli" and m not in ("qbench.__main__",):
                bad.append((m, t))
    assert not bad, bad


def test_function_local_imports_only_for_heavy_libraries():
    heavy = _heavy()
    facade = ("qbench", "qbench.api")  # qbench/__init__.py: `import qbench` loads the API on first use (PEP 562)
    offenders = [(m, t) for m in MODS for t, local in _imports(m)
                 if local and t.startswith("qbench") and t in MODS and t not in heavy and t != "qbench"
                 and (m, t) != facade]
    assert not offenders, f"import these at module level (or explain why they are heavy): {offenders[:10]}"
    assert not {"qbench.graph.qdq", "qbench.files", "qbench.errors", "qbench.data.dataset"} & heavy
