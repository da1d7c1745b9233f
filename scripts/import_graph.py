"""Draw mimkit's import graph and check it against the floors (issue 21).

Counts every ``from mimkit ...`` / ``import mimkit...`` statement, at module level and inside
functions alike (a function-level import that points up is a hidden cycle, not a fix), and prints
the rooms, the arrows that run up a floor, and the cycles between rooms.

    python scripts/import_graph.py            # summary
    python scripts/import_graph.py --edges    # every upward arrow with file:line

Rooms are the modules and packages named in FLOORS below; the floors are the layers contract in
``.importlinter`` (import-linter checks them in CI; this script shows the numbers behind them).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "mimkit"

# ground floor first; a room may import from its own floor or below
FLOORS: list[list[str]] = [
    ["errors", "nn", "masking", "losses", "flops"],
    ["targets", "weights"],
    ["methods"],
    ["data", "config"],
    ["train", "eval", "viz", "init_from", "hf", "compare", "interop", "codebook"],
    ["cli", "bench", "zoo"],
]


def room_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for each mimkit import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    own = module_name(path)
    package = own if path.name == "__init__.py" else own.rsplit(".", 1)[0]
    found = []

    def visit(node: ast.AST, in_func: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_func or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_func) for a in child.names if a.name.startswith("mimkit"))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                if mod.startswith("mimkit"):
                    # `from mimkit import bench` imports the module mimkit.bench
                    subs = [f"{mod}.{a.name}" for a in child.names if is_module(f"{mod}.{a.name}")]
                    found.extend((m, child.lineno, in_func) for m in (subs or [mod]))
            visit(child, inner)

    visit(tree, False)
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edges", action="store_true", help="list every upward arrow")
    args = ap.parse_args()
    floor = {room: i for i, rooms in enumerate(FLOORS) for room in rooms}
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    n_func = n_all = 0
    for path in sorted(ROOT.rglob("*.py")):
        src = room_of(module_name(path))
        for mod, line, in_func in imports(path):
            dst = room_of(mod)
            n_all += 1
            n_func += in_func
            if dst != src and dst != "__init__":
                edges[(src, dst)].append(f"{path.relative_to(ROOT.parent)}:{line}{' (in function)' if in_func else ''}")
    rooms = sorted({r for e in edges for r in e})
    unknown = [r for r in rooms if r not in floor]
    up = {e: w for e, w in edges.items() if e[0] in floor and e[1] in floor and floor[e[1]] > floor[e[0]]}
    # cycles: strongly connected components of the room graph (Tarjan)
    graph = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
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
                sccs.append(sorted(comp))

    for r in rooms:
        if r not in index:
            strong(r)
    print(f"{len(rooms)} rooms, {n_all} mimkit imports ({n_func} inside functions), {len(edges)} room-to-room arrows")
    print(f"upward arrows: {len(up)}; cycles: {len(sccs)}; rooms on no floor: {unknown or 'none'}")
    for comp in sccs:
        print("  cycle:", " <-> ".join(comp))
    for (a, b), where in sorted(up.items()):
        print(f"  up: {a} (floor {floor[a] + 1}) -> {b} (floor {floor[b] + 1}), {len(where)} imports")
        if args.edges:
            for w in where:
                print("      ", w)
    return 1 if up or sccs or unknown else 0


if __name__ == "__main__":
    sys.exit(main())
