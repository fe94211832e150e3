"""A rank that fails alone at start-up, before any model is built, in real multi-process launches of the example
script (ranks started with env:// variables and no torchrun, so no agent ends the others and rank 0's own process
hosts the store): the job ends by itself within seconds of the failure with default flags, and the output holds
the failing rank's own message and one line from the others naming that rank and its error. The launches' time
limit (START_UP_S) only bounds the ranks' start-up on a loaded machine (four ranks importing torch and
megatron-core on 2 shared cores took 11-58 s); how promptly the job ends is measured from the failing rank's exit.
"""

import re

from megatron_longvila.runtime.file_view import HIDE_ENV
from megatron_longvila.training.faults import INJECT_ENV

from .launch import envrun

START_UP_S = 180
"""Time limit of each launch (start-up included); a rank still alive then is killed and the test fails."""
PROMPT_S = 20
"""The ranks' exits lie within this many seconds of each other: the failed rank waits for the others'
acknowledgements (at most 2 heartbeats + 5 s), the others see the failure within a heartbeat (1 s) or, for an
error marked alike, after a 5 s grace; the rest is process teardown on a loaded machine."""


def _argv(manifest, ranks):
    return ["--cpu", "--recipe", "short_sft", "--vision-encoder", "siglip_tiny", "--llm", "tiny",
            "--context-parallel-size", str(ranks), "--hierarchical-context-parallel-sizes", str(ranks), "1",
            "--seq-length", "384", "--global-batch-size", "2", "--train-iters", "2", "--data-path", manifest]


def _lines(run, pattern):
    return [line for line in run.worker_lines() if re.search(pattern, line)]


def _manifest(tmp_path):
    m = tmp_path / "m.jsonl"  # never read: the runs stop before the data
    m.write_text('{"id": "a", "video": "a.mp4", "conversations": []}\n')
    return str(m)


def test_one_rank_failing_at_startup_ends_a_4_rank_job(tmp_path):
    run = envrun(_argv(_manifest(tmp_path), 4), procs=4, env={INJECT_ENV: "startup@0:rank=2"}, timeout=START_UP_S)
    # Every rank ended by itself (none killed at the limit): rank 2 with its error, the others as after a fault ...
    assert run.rcs == [3, 3, 1, 3] and not run.workers_left, run.out[-4000:]
    # ... and together: once rank 2 failed, the others did not wait (start-up itself is most of the run).
    assert max(run.ends) - min(run.ends) < PROMPT_S, run.ends
    own = _lines(run, r"^\[rank 2\] error: InjectedFault: rank 2: start-up fault injected by " + INJECT_ENV)
    assert len(own) == 1, run.out[-4000:]
    said = _lines(run, r"\[monitor\] rank 2 failed at start-up on \S+: InjectedFault: rank 2: start-up fault")
    assert len(said) == 1 and "every other rank exits with status 3" in said[0], run.out[-4000:]
    assert not _lines(run, r"\[rank [013]\] error"), run.out[-4000:]


def test_data_path_one_rank_cannot_read(tmp_path):
    """The flag's one-line message, from the one rank that cannot read the file (rank 0 can, so rank 1 says it),
    before any model is built; the other rank ends with one line naming rank 1."""
    m = _manifest(tmp_path)
    run = envrun(_argv(m, 2), procs=2, env={HIDE_ENV: f"eio@1:{m}"}, timeout=START_UP_S)
    assert run.rcs == [3, 2] and not run.workers_left, run.out[-4000:]
    assert max(run.ends) - min(run.ends) < PROMPT_S, run.ends
    own = _lines(run, rf"^\[rank 1\] error: ArgumentError: --data-path {re.escape(m)} cannot be read "
                      r"\(Input/output error")
    assert len(own) == 1, run.out[-4000:]
    assert len(_lines(run, r"\[monitor\] rank 1 failed at start-up .*--data-path")) == 1, run.out[-4000:]
    # Nothing else: no model, no checkpoint note, no traceback from the project's code.
    said = [line for line in run.worker_lines() if line.strip() and not line.startswith("-----")]
    assert sorted(said) == sorted(own + _lines(run, r"\[monitor\]")), run.out[-4000:]
