"""Faults injected into real torchrun launches of the example script (2 CPU ranks, tiny model), and the resume after
each one equal to the uninterrupted run, bitwise in fp32.

- a rank SIGSTOPped mid-step: the watchdog ends the job within its limit, naming that rank, once;
- rank 0 SIGSTOPped in a launch without torchrun, where rank 0's process hosts the store: the other rank says so
  and ends it;
- a rank SIGKILLed mid-step in a two-"node" job (each torchrun watches only its own rank): the other rank names
  the lost one and ends within seconds;
- a NaN loss in one micro-batch and a NaN gradient on one rank: reported with the iteration, rank, micro-batch and
  sample ids; skipped within --max-skipped-nonfinite-steps (model and optimizer shards bitwise unchanged by the
  skipped step, the learning-rate schedule not advanced); over the budget the run stops at its last good checkpoint,
  and a resume with a larger budget equals the run that had it from the start;
- a save that fails with a real write error (rank 1 under RLIMIT_FSIZE, SIGXFSZ ignored): reported once, nothing
  committed, the previous checkpoint stays the latest;
- a shard truncated and one byte-flipped after saving: check_checkpoint.py and --load name the files and refuse;
  --ckpt-load-newest-valid resumes from the newest intact checkpoint;
- a checkpoint that one rank of 4 cannot see (runtime/file_view.py): the resumed job stops at start-up, naming it.
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from .launch import ROOT, envrun, losses, records, torchrun

pytest.importorskip("av")

INJECT = "MEGATRON_LONGVILA_INJECT_FAULT"
ITERS = 6


def _argv(manifest, save, metrics, *extra):
    return ["--cpu", "--recipe", "short_sft", "--vision-encoder", "siglip_tiny", "--llm", "tiny",
            "--tensor-model-parallel-size", "1", "--context-parallel-size", "2",
            "--hierarchical-context-parallel-sizes", "2", "1", "--seq-length", "384", "--global-batch-size", "2",
            "--train-iters", str(ITERS), "--lr", "2e-3", "--min-lr", "2e-4", "--lr-warmup-iters", "1",
            "--num-frames", "6", "--data-path", manifest, "--log-interval", "1", "--seed", "7",
            "--save", save, "--save-interval", "2", "--metrics-file", metrics, *extra]


def _once(launch, pattern):
    """The lines the ranks printed that match `pattern` (torchrun's own summary left out)."""
    return [line for line in launch.worker_lines() if re.search(pattern, line)]


def _tracker(d):
    return int(open(os.path.join(d, "latest_checkpointed_iteration.txt")).read())


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    from ..training.example_script import load_example_script

    return load_example_script().write_demo_dataset(str(tmp_path_factory.mktemp("fault_data")), num_videos=12)


@pytest.fixture(scope="module")
def reference(manifest, tmp_path_factory):
    """The uninterrupted run: its losses and its checkpoints (iterations 2, 4, 6)."""
    d = tmp_path_factory.mktemp("reference")
    save, metrics = str(d / "ckpt"), str(d / "metrics.jsonl")
    run = torchrun(_argv(manifest, save, metrics))
    assert run.rc == 0, run.out[-4000:]
    out = losses(metrics)
    assert sorted(out) == list(range(1, ITERS + 1))
    return {"losses": out, "save": save, "records": records(metrics)}


def test_stopped_rank_is_named_by_the_watchdog(manifest, reference, tmp_path):
    save, metrics = str(tmp_path / "ckpt"), str(tmp_path / "m.jsonl")
    run = torchrun(_argv(manifest, save, metrics, "--watchdog-min-seconds", "5", "--watchdog-interval", "0.5"),
                   env={INJECT: "sigstop@5:rank=1:mb=0"}, timeout=120)
    assert run.rc != 0 and not run.workers_left, run.out[-4000:]  # the stopped rank was ended too
    msg = _once(run, r"\[watchdog\] iteration 5 has run")
    assert len(msg) == 1, run.out[-4000:]
    assert _once(run, r"rank 1 is stopped \(SIGSTOP"), run.out[-4000:]
    ran = float(re.search(r"has run ([\d.]+) s", msg[0]).group(1))
    # Noticed just past --watchdog-min-seconds (printed to 0.1 s), not after the 10-minute timeout.
    assert 5.0 <= ran < 12.0, msg
    # The job ended within the watchdog's limit (plus start-up), not after --distributed-timeout-minutes.
    assert run.seconds < 90, run.seconds
    assert _tracker(save) == 4
    first = losses(metrics)
    assert {i: first[i] for i in (1, 2, 3, 4)} == {i: reference["losses"][i] for i in (1, 2, 3, 4)}
    resumed = torchrun(_argv(manifest, save, metrics, "--load", save))
    assert resumed.rc == 0, resumed.out[-4000:]
    assert losses(metrics) == reference["losses"]  # bitwise: floats compared exactly


def test_stopped_rank0_hosting_the_store(manifest, tmp_path):
    """Without torchrun's agent, rank 0's own process hosts the store: stopping rank 0 stops the store too. The
    other rank notices once its step is over the limit, says so once, ends the stopped rank 0 and exits."""
    save, metrics = str(tmp_path / "ckpt"), str(tmp_path / "m.jsonl")
    run = envrun(_argv(manifest, save, metrics, "--watchdog-min-seconds", "5", "--watchdog-interval", "0.5"),
                 env={INJECT: "sigstop@5:rank=0:mb=0"}, timeout=120)
    assert run.rcs[1] == 3 and run.rcs[0] == -9 and not run.workers_left, run.out[-4000:]
    msg = _once(run, r"\[watchdog\] iteration 5: the job's rendezvous store at .* does not answer")
    assert len(msg) == 1 and "rank 0 is stopped (SIGSTOP" in msg[0], run.out[-4000:]
    assert _tracker(save) == 4


def test_killed_rank_ends_the_others_at_once(manifest, reference, tmp_path):
    save, metrics = str(tmp_path / "ckpt"), str(tmp_path / "m.jsonl")
    run = torchrun(_argv(manifest, save, metrics), nodes=2, env={INJECT: "sigkill@5:rank=1:mb=0"}, timeout=120)
    assert run.rcs[0] != 0 and run.rcs[1] != 0, run.out[-4000:]
    assert len(_once(run, r"\[watchdog\] iteration 5: a collective failed on rank 0")) == 1, run.out[-4000:]
    assert _once(run, r"rank 1 is gone: its process .* has exited"), run.out[-4000:]
    # Rank 1 died early in step 5 (its last metrics line is step 4's); rank 0's node ended within seconds.
    since_last_step = run.started_at + run.ends[0] - os.path.getmtime(metrics)
    assert since_last_step < 15, since_last_step
    assert _tracker(save) == 4
    resumed = torchrun(_argv(manifest, save, metrics, "--load", save))
    assert resumed.rc == 0, resumed.out[-4000:]
    assert losses(metrics) == reference["losses"]


def _train_state(save, it):
    with open(os.path.join(save, f"iter_{it:07d}", "train_state.json")) as f:
        return json.load(f)


def _shards(save, it):
    with open(os.path.join(save, f"iter_{it:07d}", "manifest.json")) as f:
        files = json.load(f)["files"]
    return {k: v["checksum"] for k, v in files.items() if k.endswith(".distcp")}


def test_nonfinite_steps_skipped_within_budget_and_stop_past_it(manifest, reference, tmp_path):
    faults = "nan_loss@3:rank=1:mb=1,nan_grad@5:rank=0"
    # Within the budget: both reported, both skipped, the run completes.
    skip, skip_m = str(tmp_path / "skip"), str(tmp_path / "skip.jsonl")
    run = torchrun(_argv(manifest, skip, skip_m, "--max-skipped-nonfinite-steps", "2", "--save-interval", "1"),
                   env={INJECT: faults})
    assert run.rc == 0, run.out[-4000:]
    loss_msg = _once(run, r"rank 1: loss nan in micro-batch 1 of 2 \(samples: clip_\d+")
    grad_msg = _once(run, r"rank 0: non-finite gradients before the data-parallel reduction \(first parameter: \w")
    assert len(_once(run, r"\[nonfinite\] iteration 3")) == 1 and len(loss_msg) == 1, run.out[-4000:]
    assert len(_once(run, r"\[nonfinite\] iteration 5")) == 1 and grad_msg, run.out[-4000:]
    assert len(_once(run, r"skipped: no optimizer step")) == 2
    straight = losses(skip_m)
    assert straight[1] == reference["losses"][1] and straight[2] == reference["losses"][2]
    assert straight[3] != straight[3]  # the NaN step's own loss
    # A skipped step leaves the model and optimizer bitwise as they were, and does not advance the schedule.
    assert _shards(skip, 3) == _shards(skip, 2) and _shards(skip, 5) == _shards(skip, 4)
    assert _shards(skip, 4) != _shards(skip, 3)
    rec = records(skip_m)
    # (the logged lr is the one the next step uses: the skipped step 3 leaves it; from then on it is one step behind)
    assert rec[3]["lr"] == rec[2]["lr"] and rec[4]["lr"] == reference["records"][3]["lr"]
    assert _train_state(skip, 6)["skipped_nonfinite_steps"] == 2

    # Over the budget: the second one stops the run; the last good checkpoint (4) holds the count (1).
    over, over_m = str(tmp_path / "over"), str(tmp_path / "over.jsonl")
    run = torchrun(_argv(manifest, over, over_m, "--max-skipped-nonfinite-steps", "1"), env={INJECT: faults})
    assert run.rc != 0, run.out[-4000:]
    stop = _once(run, r"stopping: 2 non-finite step\(s\) in this run, over --max-skipped-nonfinite-steps 1")
    assert len(stop) == 1, run.out[-4000:]
    assert _once(run, r"resume with --load .*over \(its latest checkpoint: iteration 4\)")
    assert _tracker(over) == 4 and _train_state(over, 4)["skipped_nonfinite_steps"] == 1
    # Resumed with the budget raised, the same fault is skipped and the run equals the one that had the budget.
    resumed = torchrun(_argv(manifest, over, over_m, "--load", over, "--max-skipped-nonfinite-steps", "2"),
                       env={INJECT: "nan_grad@5:rank=0"})
    assert resumed.rc == 0, resumed.out[-4000:]
    got = losses(over_m)
    assert {i: got[i] for i in (4, 5, 6)} == {i: straight[i] for i in (4, 5, 6)}
    assert _train_state(over, 6)["skipped_nonfinite_steps"] == 2


def test_failed_save_keeps_the_previous_checkpoint(manifest, reference, tmp_path):
    save, metrics = str(tmp_path / "ckpt"), str(tmp_path / "m.jsonl")
    # Rank 1 writes its 32 KB extra/ file under a 20 KB file-size limit: the kernel refuses the write (EFBIG). With the
    # replica-0 ranks writing the shards, that file is all rank 1 writes.
    run = torchrun(_argv(manifest, save, metrics, "--no-ckpt-fully-parallel-save"),
                   env={INJECT: "fsize@4:rank=1:bytes=20000"})
    assert run.rc != 0, run.out[-4000:]
    msg = _once(run, r"\[checkpoint\] saving iteration 4 to .* failed")
    assert len(msg) == 1, run.out[-4000:]
    assert len(_once(run, r"rank 1: OSError: \[Errno 27\] File too large: .*rank_00001\.pt")) == 1, run.out[-4000:]
    assert _once(run, r"still names iteration 2, which is untouched and loadable")
    assert _tracker(save) == 2 and not os.path.exists(os.path.join(save, "iter_0000004"))
    resumed = torchrun(_argv(manifest, save, metrics, "--load", save))
    assert resumed.rc == 0, resumed.out[-4000:]
    assert losses(metrics) == reference["losses"]
    assert _tracker(save) == ITERS and not os.path.exists(os.path.join(save, ".iter_0000004.partial"))


def _check(path, *extra):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "check_checkpoint.py"), path, *extra],
                       capture_output=True, text=True, timeout=120)
    return r.returncode, r.stdout + r.stderr


def test_corrupt_shards_are_named_and_refused(manifest, reference, tmp_path):
    save, metrics = str(tmp_path / "ckpt"), str(tmp_path / "m.jsonl")
    shutil.copytree(reference["save"], save)
    assert _check(save, "--all")[0] == 0
    with open(os.path.join(save, "iter_0000006", "__0_1.distcp"), "r+b") as f:
        f.truncate(1000)
    path = os.path.join(save, "iter_0000004", "__0_0.distcp")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))

    rc, out = _check(save, "--all", "--json")
    report = json.loads(out)
    assert rc == 1 and not report["ok"]
    bad = {os.path.basename(c["path"]): [p["file"] for p in c["problems"]] for c in report["checkpoints"]}
    assert bad == {"iter_0000006": ["__0_1.distcp"], "iter_0000004": ["__0_0.distcp"], "iter_0000002": []}
    assert "truncated" in out and "the bytes changed" in out

    refused = torchrun(_argv(manifest, save, metrics, "--load", save))
    assert refused.rc != 0
    text = refused.out
    assert re.search(r"iter_0000006 failed verification: __0_1\.distcp: 1000 bytes, the manifest says \d+ "
                     r"\(truncated\)", text) and "--ckpt-load-newest-valid" in text, text[-4000:]
    assert not os.path.exists(metrics)  # refused before training

    resumed = torchrun(_argv(manifest, save, metrics, "--load", save, "--ckpt-load-newest-valid"))
    assert resumed.rc == 0, resumed.out[-4000:]
    assert len(_once(resumed, r"iter_0000004 failed verification: __0_0\.distcp: crc32c? \w+, the manifest says")) == 1
    assert len(_once(resumed, r"loading iteration 2 instead")) == 1
    got = losses(metrics)
    assert {i: got[i] for i in (3, 4, 5, 6)} == {i: reference["losses"][i] for i in (3, 4, 5, 6)}
    assert _check(save, "--all")[0] == 0  # the re-saves replaced both corrupt checkpoints


def test_rank_that_cannot_see_the_checkpoint_stops_the_job(manifest, reference, tmp_path):
    """Issue 19: 4 ranks resume (--load = --save) from a checkpoint that rank 3 alone cannot see, as on a node with a
    stale network file system (runtime/file_view.py): before, rank 3 started over while its peers loaded, and the job
    hung silently; now it stops at start-up, with default flags, naming rank 3 and --load as given."""
    save = str(tmp_path / "ckpt")
    shutil.copytree(reference["save"], save)
    given = os.path.relpath(save, ROOT)  # the launch runs in ROOT: a relative --load must come back verbatim
    metrics = str(tmp_path / "m.jsonl")
    run = torchrun(_argv(manifest, given, metrics, "--load", given), procs=4, timeout=180,
                   env={"MEGATRON_LONGVILA_HIDE_FILES": f"missing@3:{glob.escape(save)}"})
    assert run.rc != 0 and max(run.ends) < 120, (run.ends, run.out[-4000:])
    assert run.out.count(f"the ranks see different checkpoints in --load {given};") == 1, run.out[-4000:]
    assert run.out.count("rank 3 (host ") == 1 and "): no checkpoint (no latest_checkpointed_iteration.txt)" in run.out
    assert re.search(r"ranks 0-2 \(host [^)]+\): iteration 6 \(iter_0000006\)", run.out), run.out[-4000:]
    assert not os.path.exists(metrics) and _tracker(save) == ITERS  # stopped before training, nothing saved
