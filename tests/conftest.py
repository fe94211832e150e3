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

# The rules' names for `-p no:<name>`: only a machine that lacks the test dependencies by design (the GPU session,
# tools/gpu_session.sh) turns the first two off; nothing turns the third off.
REQUIREMENTS, SKIPS, LEFTOVERS = "longvila-requirements", "longvila-skip-rule", "longvila-leftover-rule"


def pytest_configure(config):
    """The rules of a test run (tests/_rules, README): required packages, allowed skips, no leftovers."""
    pm = config.pluginmanager
    if not pm.is_blocked(REQUIREMENTS):
        try:
            requirements.check()
        except RuntimeError as e:
            raise pytest.UsageError(str(e)) from None
    if pm.is_blocked(LEFTOVERS):
        raise pytest.UsageError(f"-p no:{LEFTOVERS}: the rule that no test leaves a process running cannot be "
                                "turned off")
    # Before any test starts a process: the marker must be in the environment they inherit.
    pm.register(LeftoverRule(), LEFTOVERS)
    pm.register(SkipRule(), SKIPS)  # not registered (and not checked) under -p no:longvila-skip-rule
