"""The package's layer order, enforced: read from the source (every import statement, never by importing), checked
against the order written in `.importlinter`, and by import-linter itself.

Counted: imports at module level, inside functions and inside `try` blocks; `importlib.import_module` and
`__import__` of the package's own modules. Not counted: imports under `if TYPE_CHECKING:` (annotations only).
"""

from __future__ import annotations

import ast
import configparser
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from typing import Dict, List, Set, Tuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = "megatron_longvila"
MAX_LAZY = 10
"""Imports of the package's own modules made inside functions across folders (distinct importer -> imported pairs)."""


def _modules() -> Dict[str, str]:
    mods = {}
    for dirpath, _, files in os.walk(os.path.join(ROOT, PKG)):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                mods[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(dirpath, f)
    return mods


MODS = _modules()


def _known(name: str) -> str:
    """The longest module of the package that `name` (a module or a name inside one) lies in; "" outside."""
    while name and name not in MODS:
        name = name.rsplit(".", 1)[0] if "." in name else ""
    return name


def _targets(cur: str, node) -> List[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            parts = cur.split(".")
            base = parts if MODS[cur].endswith("__init__.py") else parts[:-1]
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
    out = []
    for n in names:
        if n == PKG or n.startswith(PKG + "."):
            k = _known(n)
            if k:
                out.append(k)
    return out


def room(module: str) -> str:
    """A module's folder (or top-level module): the unit the layer order is about."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else parts[0]


class Graph:
    """Every import of the package's own modules, file to file."""

    def __init__(self):
        self.edges: Dict[str, Set[str]] = defaultdict(set)
        self.lazy: List[Tuple[str, str, str, int]] = []  # (importer, imported, path, line) inside functions
        self.test_imports: List[str] = []
        self.dynamic: List[str] = []
        for m, path in MODS.items():
            src = open(path, encoding="utf-8").read()
            lines = src.splitlines()
            tree = ast.parse(src, path)
            in_func, type_only = set(), set()
            for n in ast.walk(tree):
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    in_func.update(id(c) for c in ast.walk(n) if isinstance(c, (ast.Import, ast.ImportFrom)))
                if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
                    type_only.update(id(c) for c in ast.walk(n))
            for n in ast.walk(tree):
                if isinstance(n, ast.Call) and n.args and isinstance(n.args[0], ast.Constant) \
                        and isinstance(n.args[0].value, str) and n.args[0].value.startswith(PKG) \
                        and ast.unparse(n.func).split(".")[-1] in ("import_module", "__import__"):
                    self.dynamic.append(f"{m}:{n.lineno} {ast.unparse(n)}")
                    t = _known(n.args[0].value)
                    if t and t != m:
                        self.edges[m].add(t)
                if not isinstance(n, (ast.Import, ast.ImportFrom)) or id(n) in type_only:
                    continue
                named = ([a.name for a in n.names] if isinstance(n, ast.Import)
                         else [n.module or ""] + [f"{n.module}.{a.name}" for a in n.names if n.module])
                targets = _targets(m, n)
                if (any(x == "tests" or x.startswith("tests.") for x in named)
                        or any(t.split(".")[-1] == "testing" for t in targets)
                        or (isinstance(n, ast.ImportFrom) and n.level and any(a.name == "testing" for a in n.names))):
                    self.test_imports.append(f"{m}:{n.lineno} {ast.unparse(n)}")
                for t in targets:
                    if t == m:
                        continue
                    self.edges[m].add(t)
                    if id(n) in in_func and room(t) != room(m):
                        reason = _reason(lines, n.lineno)
                        self.lazy.append((m, t, f"{path}:{n.lineno}", reason))

    def room_edges(self) -> Dict[str, Set[str]]:
        out: Dict[str, Set[str]] = defaultdict(set)
        for a, bs in self.edges.items():
            for b in bs:
                if room(a) != room(b):
                    out[room(a)].add(room(b))
        return out


def _reason(lines: List[str], lineno: int) -> str:
    """The one-line reason a lazy import carries: a comment on its line, or on the comment line just above the block
    of consecutive import lines it belongs to."""
    i = lineno - 1
    while i >= 0:
        text = lines[i].strip()
        if "#" in text:
            comment = text.split("#", 1)[1].strip()
            if comment and not comment.startswith("noqa"):
                return comment
        if i < lineno - 1 and not text.startswith(("from ", "import ")):
            return ""
        i -= 1
    return ""


def _cycles(nodes, edges) -> List[List[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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
                out.append(sorted(comp))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def layer_order() -> List[List[str]]:
    """The layers, lowest first, each a list of sibling rooms, as `.importlinter` writes them (highest first)."""
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, ".importlinter"))
    text = cfg["importlinter:contract:layers"]["layers"]
    layers = [[f"{PKG}.{x.strip()}" for x in re.split(r"[|:]", line) if x.strip()]
              for line in text.strip().splitlines() if line.strip()]
    return layers[::-1]


GRAPH = Graph()


def test_no_cycle_between_folders():
    rooms = {room(m) for m in MODS}
    assert _cycles(rooms, GRAPH.room_edges()) == []


def test_no_cycle_between_files():
    assert _cycles(set(MODS), GRAPH.edges) == []


def test_each_folder_imports_only_folders_before_it():
    layers = layer_order()
    rank = {r: i for i, layer in enumerate(layers) for r in layer}
    rooms = {room(m) for m in MODS} - {PKG}
    assert sorted(rooms - set(rank)) == [], "every folder and top-level module has a place in .importlinter's layers"
    bad = []
    for a, bs in GRAPH.room_edges().items():
        for b in bs:
            if b == PKG:
                bad.append(f"{a} imports the top-level package (write `from ..errors import X`, not `from .. import`)")
            elif a != PKG and rank[b] >= rank[a]:
                bad.append(f"{a} (layer {rank[a]}) imports {b} (layer {rank[b]})")
    assert bad == []


def test_top_level_package_imports_only_the_warning_filters():
    assert GRAPH.edges.get(PKG, set()) <= {f"{PKG}.runtime", f"{PKG}.runtime.quiet"}


def test_lazy_imports_across_folders_are_few_and_explained():
    pairs = sorted({(m, t) for m, t, _, _ in GRAPH.lazy})
    assert len(pairs) <= MAX_LAZY, f"{len(pairs)} imports across folders inside functions: {pairs}"
    unexplained = [f"{where}: {m} -> {t}" for m, t, where, reason in GRAPH.lazy if not reason]
    assert unexplained == [], "each import across folders inside a function says why on its line or the one above"


def test_no_production_import_of_test_helpers():
    assert GRAPH.test_imports == []
    assert not any(m.split(".")[-1] == "testing" for m in MODS), "no production module is named testing"


def test_no_dynamic_imports_of_the_package():
    assert GRAPH.dynamic == [], "importlib.import_module / __import__ of the package's own modules is no way around"


def test_import_linter_contracts():
    exe = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")
    assert exe is not None, "import-linter is a test dependency (pip install -e '.[test]')"
    out = subprocess.run([exe, os.path.join(ROOT, ".importlinter"), "--no-cache"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_architecture_doc_lists_the_layer_order():
    """docs/ARCHITECTURE.md's diagram names the layers in the order `.importlinter` enforces."""
    doc = open(os.path.join(ROOT, "docs", "ARCHITECTURE.md"), encoding="utf-8").read()
    block = doc.split("```", 2)[1]
    found = []
    for line in block.splitlines():
        names = re.findall(r"\b([a-z_]+)(?:/|\.py)", line)
        if names:
            found.append(names)
    want = [[r.split(".", 1)[1] for r in layer] for layer in layer_order()[::-1]]
    assert found == want, f"the diagram's layers {found} differ from .importlinter's {want}"


if __name__ == "__main__":  # a report without pytest
    g = Graph()
    print("lazy:", *sorted({(m, t, r) for m, t, _, r in g.lazy}), sep="\n  ")
    print("room cycles:", _cycles({room(m) for m in MODS}, g.room_edges()))
    print("file cycles:", _cycles(set(MODS), g.edges))
    sys.exit(pytest.main([__file__, "-q"]))
