"""Rule 1: the test run needs every dependency the package declares and its `test` extra (setup.py, read as written,
so the list lives in one place); one missing or at the wrong version stops the run at start-up."""

from __future__ import annotations

import ast
import os
from importlib import metadata
from typing import Dict, List

from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXTRA = "test"


def declared(setup_py: str = os.path.join(ROOT, "setup.py")) -> List[str]:
    """install_requires and extras_require[EXTRA] of setup.py's setup() call (literals)."""
    tree = ast.parse(open(setup_py).read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup")
    kw: Dict[str, object] = {k.arg: ast.literal_eval(k.value) for k in call.keywords
                             if k.arg in ("install_requires", "extras_require")}
    return list(kw["install_requires"]) + list(kw["extras_require"][EXTRA])


def problems(requirements: List[str]) -> List[str]:
    """'<requirement>: not installed' or '<requirement>: <version> installed' for each one not met."""
    out = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": EXTRA}):
            continue
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            out.append(f"{text}: not installed")
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            out.append(f"{text}: {have} installed")
    return out


def check() -> None:
    """Raise RuntimeError naming what to install when a declared requirement is not met."""
    bad = problems(declared())
    if bad:
        raise RuntimeError(
            f"the tests need the package's dependencies and its '{EXTRA}' extra (setup.py); not met:\n  "
            + "\n  ".join(bad) + f"\ninstall them: pip install -e '.[{EXTRA}]' (make setup does, into .venv)")
