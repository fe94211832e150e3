"""The rules of a test run, checked by tests/conftest.py (README, "make test"):

- requirements: every dependency of the package and of its `test` extra (setup.py) is installed, or the run stops at
  start-up naming what to install;
- skips: a test may skip only for a reason on the allowed list (a GPU-only dependency, a Megatron-LM checkout),
  and only where that reason is true; any other skip fails the run, its reason printed;
- leftovers: no process the run started outlives it; one still alive at its end is killed, listed with the test
  that was running when it started, and fails the run.
"""
