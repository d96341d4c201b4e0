"""r1mega's import graph: no cycles, no upward imports between layers, the trainer's run groups
apart, kernels apart from the math they are checked against. Read from the source (every import
statement, in functions too), so nothing needs to be importable here."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Set

ROOT = Path(__file__).resolve().parents[2] / "r1mega"

# Lowest first: a module may import its own layer and the layers before it, never a later one.
LAYERS = [
    ["r1mega.config.schema", "r1mega.config.sglang_schema", "r1mega.config.bench_schema",
     "r1mega.config.choices", "r1mega.config.errors"],  # declarations only
    ["r1mega.platform"],
    ["r1mega.config"],
    ["r1mega.algorithms"],
    ["r1mega.ops"],
    ["r1mega.rewards"],
    ["r1mega.data"],
    ["r1mega.models"],
    ["r1mega.checkpoint"],
    ["r1mega.rollout"],
    ["r1mega.trainer"],
    ["r1mega.recipe", "r1mega.bench"],
    ["r1mega.slurm"],
    ["r1mega.cli"],
]
# The trainer's run groups reach each other only through its shared modules.
RUN_GROUPS = ["r1mega.trainer.rl", "r1mega.trainer.sft", "r1mega.trainer.pretrain"]


def _modules() -> Dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _graph() -> Dict[str, Set[str]]:
    modules = _modules()
    edges: Dict[str, Set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            edges[name].update(t for t in targets if t in modules and t != name)
    return edges


def _layer(module: str) -> int:
    best, rank = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank >= 0, f"{module} is in no layer of this test"
    return rank


def _cycles(edges: Dict[str, Set[str]]) -> list:
    """Strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack, on, found = [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_lower_layers_never_import_higher_ones():
    upward = sorted(f"{a} -> {b}" for a, targets in _graph().items() for b in targets if _layer(b) > _layer(a))
    assert upward == []


def test_run_groups_import_each_other_only_through_shared_modules():
    def group(m: str):
        return next((g for g in RUN_GROUPS if m == g or m.startswith(g + ".")), None)

    crossing = sorted(f"{a} -> {b}" for a, targets in _graph().items() for b in targets
                      if group(a) and group(b) and group(a) != group(b))
    assert crossing == []


def test_kernels_do_not_import_the_math_they_are_checked_against():
    assert sorted(f"{a} -> {b}" for a, targets in _graph().items() if a.startswith("r1mega.ops")
                  for b in targets if b.startswith("r1mega.algorithms")) == []


def test_the_graph_sees_every_import():
    """The reader above finds relative, function-level and `from package import module` imports."""
    edges = _graph()
    assert "r1mega.trainer.rl.step" in edges["r1mega.trainer.rl.evaluate"]
    assert "r1mega.ops.logprobs_kernel" in edges["r1mega.ops.logprobs"]
    assert len(edges) > 100
