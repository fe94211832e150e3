"""One resume decision per job (checkpoint/resume.py), on 4 gloo ranks in one call: each rank's view of a checkpoint
folder made to differ with runtime/file_view.py (MEGATRON_LONGVILA_HIDE_FILES), as on a node with a stale or failing
network file system. A rank that sees no checkpoint, cannot read the tracker, lacks a file its peers see or cannot
read one stops every rank with one message, the same on every rank, naming the rank, what each saw and --load as
given; views that agree give the iteration (or None for no checkpoint); after a load, differing iterations stop the
job. The checkpoint readers of checkpoint/layout.py see the same view.
"""

import os

import pytest

from megatron_longvila.checkpoint import layout
from megatron_longvila.checkpoint.resume import COMMON_FILES, agree_resume, check_loaded
from megatron_longvila.errors import CheckpointError, raised_alike
from megatron_longvila.parallel.launch import run_distributed
from megatron_longvila.runtime.file_view import HIDE_ENV

ITERATION = 4

# One rule set for the whole run, each folder its own scenario.
HIDE = ";".join([
    "missing@3:*/stale",                                        # rank 3 sees no checkpoint at all
    "eio@1:*/eio_tracker/latest_checkpointed_iteration.txt",    # rank 1 cannot read the tracker
    "missing@2:*/no_manifest/iter_0000004/manifest.json",       # rank 2's listing lacks one file
    "eio@0:*/eio_metadata/iter_0000004/.metadata",              # rank 0 cannot read one file
    "eio@0:*/split/*", "eio@1:*/split/*",                        # two ranks against two: no majority
    *(f"eio@{r}:*/all_eio/latest_checkpointed_iteration.txt" for r in range(4)),  # nobody can read it
])


def _checkpoint(root):
    """A committed iteration folder as the loaders see it: the tracker, iter_N and the files every load opens."""
    folder = layout.checkpoint_dir(root, ITERATION)
    os.makedirs(os.path.join(folder, "extra"))
    for name in COMMON_FILES:
        with open(os.path.join(folder, name), "wb") as f:
            f.write(b"x" * 16)
    import torch

    torch.save({"rng": 1}, os.path.join(folder, "extra", "rank_00000.pt"))
    layout.write_tracker(root, ITERATION)
    return root


def _agree(load):
    try:
        return ("ok", agree_resume(load))
    except CheckpointError as e:
        assert raised_alike(e)
        return ("error", str(e))


def _ranks(rank, world, base):
    os.environ[HIDE_ENV] = HIDE  # before the first file_view call of this process (it reads the variable once)
    out = {}
    for name in ("good", "stale", "eio_tracker", "no_manifest", "eio_metadata", "split", "all_eio"):
        # --load as a user may give it: a trailing slash must come back verbatim in the message.
        out[name] = _agree(os.path.join(base, name) + "/")
    out["empty"] = _agree(os.path.join(base, "empty"))
    out["none"] = _agree(None)
    # The layout readers see this rank's view too.
    stale = os.path.join(base, "stale")
    out["readers"] = (layout.read_tracker(stale), layout.committed_iterations(stale))
    try:
        layout.safe_load(os.path.join(base, "split", "iter_0000004", "extra", "rank_00000.pt"))
        out["safe_load"] = "read"
    except CheckpointError as e:
        out["safe_load"] = str(e)
    try:
        check_loaded(base, ITERATION)
        out["loaded_same"] = "ok"
    except CheckpointError as e:
        out["loaded_same"] = str(e)
    try:
        check_loaded(base, ITERATION - 2 if rank == 3 else ITERATION)
        out["loaded_diff"] = "ok"
    except CheckpointError as e:
        out["loaded_diff"] = str(e)
    return out


def test_ranks_agree_on_the_resume_iteration_or_all_stop(tmp_path):
    base = str(tmp_path)
    for name in ("good", "stale", "eio_tracker", "no_manifest", "eio_metadata", "split", "all_eio"):
        _checkpoint(os.path.join(base, name))
    os.makedirs(os.path.join(base, "empty"))
    outs = run_distributed(_ranks, 4, base, timeout=120)

    for key in outs[0]:
        if key not in ("readers", "safe_load"):
            assert all(o[key] == outs[0][key] for o in outs), (key, [o[key] for o in outs])  # alike on every rank
    o = outs[0]
    assert o["good"] == ("ok", ITERATION) and o["empty"] == ("ok", None) and o["none"] == ("ok", None)

    def failed(name):
        status, msg = o[name]
        assert status == "error", (name, o[name])
        assert f"--load {os.path.join(base, name)}/" in msg, msg  # the folder exactly as given
        return msg

    msg = failed("stale")
    assert "  rank 3 (host " in msg and "): no checkpoint (no latest_checkpointed_iteration.txt)" in msg, msg
    assert "  ranks 0-2 (host " in msg and "): iteration 4 (iter_0000004)" in msg, msg
    assert "\nRank 3 cannot see or read what its peers load: check " in msg, msg
    assert msg.index("rank 3 (") < msg.index("ranks 0-2 ("), msg  # the odd rank first

    msg = failed("eio_tracker")
    assert "rank 1 (host " in msg and "/eio_tracker/latest_checkpointed_iteration.txt is unreadable (OSError: " \
        "Input/output error" in msg and "ranks 0, 2-3 (host " in msg, msg

    msg = failed("no_manifest")
    assert "rank 2 (host " in msg and "): iteration 4 (iter_0000004) without manifest.json" in msg, msg

    msg = failed("eio_metadata")
    assert "rank 0 (host " in msg and "iter_0000004/.metadata is unreadable: OSError: Input/output error" in msg, msg
    assert "\nRank 0 cannot see or read" in msg, msg

    msg = failed("split")
    assert "ranks 0-1 (host " in msg and "ranks 2-3 (host " in msg and "No view is shared by most ranks" in msg, msg

    msg = failed("all_eio")
    assert "/, on every rank: " in msg and "all_eio/latest_checkpointed_iteration.txt is unreadable (OSError: " in msg, msg

    # The readers of checkpoint/layout.py: rank 3 sees no checkpoint in `stale`, rank 0 cannot read in `split`.
    assert outs[3]["readers"] == (None, []) and outs[0]["readers"] == (ITERATION, [ITERATION])
    assert "is unreadable (OSError: Input/output error" in outs[0]["safe_load"] and outs[3]["safe_load"] == "read"

    assert o["loaded_same"] == "ok"
    assert "the ranks loaded different iterations from --load " + base in o["loaded_diff"]
    assert "  ranks 0-2 (host " in o["loaded_diff"] and "): iteration 4" in o["loaded_diff"]
    assert "  rank 3 (host " in o["loaded_diff"] and "): iteration 2" in o["loaded_diff"]
