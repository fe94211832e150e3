"""The multi-process harness: results come back per rank, any rank's exception fails with its traceback,
a hang becomes a timeout error, and nothing a call starts outlives it. The rules of a test run (tests/_rules):
required packages from setup.py, skips only for an allowed reason that is true here, no process left running."""

import os
import re
import subprocess
import sys
import time
from importlib import metadata

import pytest
from packaging.requirements import Requirement

from megatron_longvila.errors import DistributedRunError
from megatron_longvila.parallel.launch import run_distributed, stop_helpers
from megatron_longvila.runtime import processes
from tests._rules import requirements, skips
from tests._rules.leftovers import descendants

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ok(rank, world, x):
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return (rank, world, x, t.item())


def _raise_on_rank_1(rank, world):
    if rank == 1:
        raise ValueError("rank one is unhappy")
    return rank


def _hang_on_rank_0(rank, world):
    if rank == 0:
        time.sleep(60)
    return rank


def test_results_per_rank():
    assert run_distributed(_ok, 3, "x") == [(r, 3, "x", 3.0) for r in range(3)]


def test_exception_reports_rank_and_traceback():
    with pytest.raises(DistributedRunError, match=r"(?s)rank 1 of 2 raised.*ValueError: rank one is unhappy"):
        run_distributed(_raise_on_rank_1, 2)


def test_timeout_instead_of_hang():
    t0 = time.monotonic()
    with pytest.raises(DistributedRunError, match="timed out"):
        run_distributed(_hang_on_rank_0, 2, timeout=5)
    assert time.monotonic() - t0 < 30


# --------------------------------------------------------------------------------------------------
# Nothing a call starts outlives it
# --------------------------------------------------------------------------------------------------

def _start_helpers(rank, world, fail):
    """Each rank leaves a forked child (in its process group) and a child in a session of its own (found by the
    call's mark), both sleeping for a minute; returns their pids, or raises after starting them."""
    import subprocess
    import sys

    pid = os.fork()
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    away = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    if fail:
        raise ValueError(f"helpers {pid} {away.pid}")
    return [pid, away.pid]


def _gone_soon(pids, seconds=5.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(processes.alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if processes.alive(p)]


def test_ranks_helpers_do_not_outlive_the_call():
    pids = [p for r in run_distributed(_start_helpers, 2, False) for p in r]
    assert len(pids) == 4 and _gone_soon(pids) == []


def test_failed_ranks_helpers_do_not_outlive_the_call():
    with pytest.raises(DistributedRunError, match="ValueError: helpers") as e:
        run_distributed(_start_helpers, 2, True)
    pids = [int(p) for p in re.findall(r"ValueError: helpers (\d+) (\d+)", str(e.value))[0]]
    assert _gone_soon(pids) == []


def test_stop_helpers_ends_the_start_server_and_tracker():
    run_distributed(_ok, 2, "x")
    stop_helpers()
    # The start server and the resource tracker are this process's children; none is left.
    assert descendants(os.getpid()) == []
    assert run_distributed(_ok, 2, "y") == [(r, 2, "y", 1.0) for r in range(2)]  # and it starts again


# --------------------------------------------------------------------------------------------------
# The rules of a test run (tests/_rules): required packages, allowed skips, no leftovers
# --------------------------------------------------------------------------------------------------

def test_required_packages_are_read_from_setup_py():
    names = [Requirement(r).name for r in requirements.declared()]
    assert {"transformers", "av", "megatron-energon", "nvidia-dali-cuda130", "imageio-ffmpeg"} <= set(names)
    assert requirements.problems(["torch>=2.6", "no-such-package-here>=1", "torch<1"]) == [
        "no-such-package-here>=1: not installed", f"torch<1: {metadata.version('torch')} installed"]


def test_skip_reasons_allowed_only_where_true(monkeypatch):
    monkeypatch.delenv("MEGATRON_LM_PATH", raising=False)
    assert skips.verdict("needs a Megatron-LM checkout: set MEGATRON_LM_PATH (docs/TRAINING.md)") is None
    assert skips.verdict("needs a CUDA device and an importable transformer_engine") is None  # CPU machine
    assert "not an allowed reason" in skips.verdict("could not import 'av': No module named 'av'")
    assert "not an allowed reason" in skips.verdict("megatron-energon is not installed")
    assert "not so on this machine" in skips.verdict("CUDA is visible here")  # the tests run on CPU


_RUN_TESTS = '''
import os, subprocess, sys, time, pytest

def test_allowed():
    pytest.skip("needs a Megatron-LM checkout: set MEGATRON_LM_PATH (docs/TRAINING.md)")

def test_passes():
    pass
'''

_REFUSED_TEST = '''
def test_refused():
    pytest.importorskip("no_such_module_here")
'''

_BAD_TESTS = _RUN_TESTS + _REFUSED_TEST + '''
def test_leaks():
    time.sleep(0.05)  # apart from the previous test by more than /proc's clock tick
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    open(os.environ["LEAK_PID_FILE"], "w").write(str(p.pid))
'''


def _pytest_run(tmp_path, source, *args):
    """A test session of its own (tests/conftest.py's rules) on `source`; returns (exit status, output)."""
    (tmp_path / "conftest.py").write_text("from tests.conftest import pytest_configure  # noqa: F401\n")
    (tmp_path / "test_it.py").write_text(source)
    env = dict(os.environ, PYTHONPATH=ROOT, LEAK_PID_FILE=str(tmp_path / "leak.pid"))
    env.pop("MEGATRON_LM_PATH", None)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args, str(tmp_path)],
                       capture_output=True, text=True, timeout=120, cwd=str(tmp_path), env=env)
    return r.returncode, r.stdout + r.stderr


def test_run_passes_with_allowed_skips_only(tmp_path):
    rc, out = _pytest_run(tmp_path, _RUN_TESTS)
    assert rc == 0 and "1 passed, 1 skipped" in out, out


def test_run_fails_on_a_refused_skip_and_a_leftover(tmp_path):
    rc, out = _pytest_run(tmp_path, _BAD_TESTS)
    assert rc == 1 and "2 passed, 2 skipped" in out, out
    refused = out.split("skips not allowed")[1]
    assert "test_it.py::test_refused: could not import 'no_such_module_here'" in refused, out
    assert "test_allowed" not in refused.split("processes left running")[0], out
    leaked = int((tmp_path / "leak.pid").read_text())
    assert re.search(rf"pid {leaked}, started [\d.]+ s ago: .*time.sleep\(120\)\n\s+started during: "
                     rf"test_it.py::test_leaks", out), out
    assert not processes.alive(leaked)  # killed by the rule


def test_requirements_and_skip_rule_can_be_turned_off_not_the_leftover_rule(tmp_path):
    # The GPU session lacks the test dependencies by design: it turns the requirements and the skip rule off.
    rc, out = _pytest_run(tmp_path, _RUN_TESTS + _REFUSED_TEST, "-p", "no:longvila-requirements",
                          "-p", "no:longvila-skip-rule")
    assert rc == 0 and "1 passed, 2 skipped" in out and "not allowed" not in out, out
    rc, out = _pytest_run(tmp_path, _RUN_TESTS, "-p", "no:longvila-leftover-rule")
    assert rc == 4 and "cannot be turned off" in out, out
