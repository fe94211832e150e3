import os
import sys

# Workers of the multi-process harness import test modules by name: make the repo root importable.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402

from tests._rules import requirements  # noqa: E402
from tests._rules.leftovers import LeftoverRule  # noqa: E402
from tests._rules.skips import SkipRule  # noqa: E402


def pytest_configure(config):
    """The rules of a test run (tests/_rules, README): required packages, allowed skips, no leftovers."""
    try:
        requirements.check()
    except RuntimeError as e:
        raise pytest.UsageError(str(e)) from None
    # Before any test starts a process: the marker must be in the environment they inherit.
    config.pluginmanager.register(LeftoverRule(), "longvila-leftover-rule")
    config.pluginmanager.register(SkipRule(), "longvila-skip-rule")
