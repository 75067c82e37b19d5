"""The house rules that can be checked by reading the source (docs/architecture.md, "Floors"):

- plugins import nothing of nanorl but `nanorl.api`;
- the core's modules import only their own floor and the floors below it (function-level imports included:
  a lazy upward import is still a dependency), with the exceptions docs/architecture.md states;
- no import cycles between the core's modules.

Read with `ast`, not by importing: nothing here loads torch.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"

# Floors as built, lowest first: a module may import its own floor and those below it.
FLOORS: list[tuple[str, ...]] = [
    ("nanorl", "nanorl.api"),
    ("nanorl.hookspecs", "nanorl.multichoice", "nanorl.builtin", "nanorl.plugins"),
    ("nanorl.config", "nanorl.telemetry", "nanorl.taskdata"),
    (
        "nanorl.model", "nanorl.tokenizer", "nanorl.data", "nanorl.engine", "nanorl.compiled_decode", "nanorl.optim",
        "nanorl.checkpoint", "nanorl.store", "nanorl.device", "nanorl.report", "nanorl.runlock",
    ),
    ("nanorl.stages",),
    ("nanorl.cli", "nanorl.__main__"),
]  # fmt: skip

# Upward imports made on purpose (docs/architecture.md says why): (importer, imported).
ALLOWED_UPWARD = {
    ("nanorl.config", "nanorl.tokenizer"),  # MIN_VOCAB_SIZE, the bound of model.vocab_size; tokenizer imports only api
}


def _modules(base: Path) -> dict[str, Path]:
    out = {}
    for path in sorted(base.rglob("*.py")):
        parts = list(path.relative_to(base).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(path: Path, known: set[str]) -> set[str]:
    """The nanorl modules `path` imports, anywhere in the file; `from pkg import sub` counts as pkg.sub."""
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            deps |= {a.name for a in node.names if a.name.split(".")[0] == "nanorl"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "nanorl":
                continue
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                deps.add(sub if sub in known else node.module)
    return deps


def _floor(module: str) -> int:
    """The floor of the entry in FLOORS that names `module` or the package holding it (`nanorl`: itself only)."""
    matches = [
        (len(prefix), i)
        for i, floor in enumerate(FLOORS)
        for prefix in floor
        if module == prefix or (prefix != "nanorl" and module.startswith(prefix + "."))
    ]
    assert matches, f"{module} is on no floor: add it to FLOORS (and to docs/architecture.md)"
    return max(matches)[1]


def _graph() -> dict[str, set[str]]:
    mods = _modules(SRC)
    known = set(mods)
    return {m: {d for d in _imports(p, known) if d != m} for m, p in mods.items()}


def test_plugins_import_only_nanorl_api():
    bad = []
    for path in sorted(ROOT.glob("plugins/*/src/**/*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] if node.module != "nanorl" else [f"nanorl.{a.name}" for a in node.names]
            else:
                continue
            bad += [
                f"{path.relative_to(ROOT)}:{node.lineno} {n}"
                for n in names
                if n.split(".")[0] == "nanorl" and n != "nanorl.api"
            ]
    assert not bad, "plugins may import only nanorl.api:\n" + "\n".join(bad)


def test_core_imports_go_down_the_floors_only():
    graph = _graph()
    bad = sorted(
        f"{m} (floor {_floor(m)}) imports {d} (floor {_floor(d)})"
        for m, deps in graph.items()
        for d in deps
        if _floor(d) > _floor(m) and (m, d) not in ALLOWED_UPWARD
    )
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_core_has_no_import_cycles():
    graph = _graph()
    # a package's __init__ importing its own submodules is how packages work; leave those edges out
    edges = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}
    cycles, state = [], {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for d in sorted(edges.get(m, ())):
            if state.get(d) == "open":
                cycles.append(" -> ".join([*path[path.index(d) :], d]))
            elif d not in state:
                visit(d, [*path, d])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
