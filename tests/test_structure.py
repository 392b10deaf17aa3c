"""The training stack's modules depend on each other one way only.

What a maintainer relies on: a strategy module never imports the factory that chooses it (or
another strategy back), so either can be read, changed and imported alone; more generally no
module of the training stack imports, at any depth, a module that imports it back. Imports inside
functions count: they form cycles just as well, only later. (The meta-device planner sharing
`build_vla`'s assembly is checked in tests/test_plan.py, by names and shapes.)
"""
import ast
from pathlib import Path

from conftest import REPO

# The packages a training run imports (evaluation backends are separate plug-ins).
STACK = ("vla_scale.config", "vla_scale.models", "vla_scale.train", "vla_scale.data", "vla_scale.actions")


def _modules() -> dict[str, Path]:
    mods = {}
    for path in (REPO / "vla_scale").rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def _imports(path: Path, known: set[str]) -> set[str]:
    """Every vla_scale module `path` imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} & known
            found |= {f"{node.module}.{a.name}" for a in node.names} & known
    return found


def _cycle_from(start: str, graph: dict[str, set[str]]) -> list[str] | None:
    """An import path from `start` back to itself, if there is one."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, path + [nxt]))
    return None


def test_the_training_stack_has_no_import_cycle():
    mods = _modules()
    stack = {n: p for n, p in mods.items() if n.startswith(STACK)}
    assert "vla_scale.train.strategies" in stack and "vla_scale.train.deepspeed_strategy" in stack
    graph = {n: _imports(p, set(stack)) - {n} for n, p in stack.items()}
    cycles = [c for c in (_cycle_from(n, graph) for n in sorted(graph)) if c]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_a_strategy_module_never_imports_the_factory_or_another_strategy():
    mods = _modules()
    known = set(mods)
    single = _imports(mods["vla_scale.train.strategy"], known)
    zero3 = _imports(mods["vla_scale.train.deepspeed_strategy"], known)
    assert not {"vla_scale.train.strategies", "vla_scale.train.deepspeed_strategy"} & single
    assert "vla_scale.train.strategies" not in zero3
    assert {"vla_scale.train.strategy", "vla_scale.train.deepspeed_strategy"} <= \
        _imports(mods["vla_scale.train.strategies"], known)
