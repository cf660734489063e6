"""The package's shape, checked: model forwards over a kv-cache live in state.py and the loss only, and
the imports between modules form no circle, lazy imports included."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "cacheaug"


def _calls_with_cache() -> list[str]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and any(k.arg == "cache" for k in node.keywords):
                found.append(f"{path.relative_to(SRC)}:{ast.unparse(node.func)}")
    return found


def test_forwards_over_a_cache_sit_in_state_py_or_the_loss():
    allowed = {
        "state.py:base",  # state.base_forward: every decode-time step of the base
        "latents.py:self.stack",  # Coprocessor.forward: the coprocessor reads the base's cache
        "coprocessor.py:self.base.get_decoder()",  # training_loss: the prefix, read once
        "coprocessor.py:self.base",  # training_loss: all groups in one block-masked pass
        "coprocessor.py:steps.prefill",  # AugmentedLM.prefill delegates to state.py
    }
    assert set(_calls_with_cache()) <= allowed, sorted(set(_calls_with_cache()) - allowed)


def _module_imports() -> dict[str, set[str]]:
    """Imports between cacheaug's own modules, at module level and inside functions (lazy ones included)."""
    graph = {}
    for path in sorted(SRC.rglob("*.py")):
        name = ".".join(path.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__")
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
                names = [module] if node.module else [f"{module}.{alias.name}" for alias in node.names]
                targets.update(names)
        graph[name] = targets
    return graph


def test_no_import_circles_even_through_lazy_imports():
    graph = _module_imports()
    known = set(graph)

    def resolve(target: str) -> str | None:
        while target and target not in known:
            target = target.rsplit(".", 1)[0] if "." in target else ""
        return target or None

    edges = {name: {resolve(t) for t in targets} - {None, name} for name, targets in graph.items()}
    for start in edges:
        seen, stack = set(), [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in edges.get(node, ()):
                if nxt == start and not (start.endswith(("cacheaug", "__init__")) or nxt == "cacheaug"):
                    raise AssertionError(" -> ".join(path + [nxt]))
                if nxt not in seen and nxt != "cacheaug":
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
