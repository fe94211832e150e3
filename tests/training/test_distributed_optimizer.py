"""The distributed optimizer (--use-distributed-optimizer) through the example script on CPU ranks.

One 4-rank world (TP 1, CP 2x1, so DP 2: each DP rank owns half of the Adam state):
- exact resume: 4 steps straight equal 2 steps + save + load + 2 steps, bitwise (fp32);
- the loaded Adam state gives every parameter its own `step`: with that repair disabled the same resume goes
  wrong from the first step after loading (the trap this guards against, shown to be real);
- a killed save keeps the previous checkpoint (a rank killed after writing its shards of the iteration-4 save,
  the optimizer's gathered state included), and the run resumes from it.
"""

import os
import signal

import pytest

from megatron_longvila.errors import DistributedRunError
from megatron_longvila.parallel.launch import run_distributed
from megatron_longvila.checkpoint.layout import read_tracker

from .test_training import _argv, _script, manifest  # noqa: F401  (the fixture)

pytest.importorskip("av")

DISTOPT = ["--use-distributed-optimizer"]


def _world(rank, world, manifest, tmp):
    import torch.distributed as dist

    from megatron_longvila.runtime import megatron_optimizer as mo

    mod = _script()

    def run(extra=(), hooks=None, iters=4):
        return mod.pretrain(mod.train_valid_test_datasets_provider, mod.model_provider, mod.forward_step,
                            extra_args_provider=mod.extra_args_provider,
                            argv=_argv(manifest, tp=1, u=2, r=1, iters=iters, extra=DISTOPT + list(extra)),
                            hooks=hooks)

    out = {}
    d = os.path.join(tmp, "distopt")
    out["straight"] = run().losses
    first = run(["--save", d, "--save-interval", "2"], hooks={"stop_after": 2})
    from megatron.core import parallel_state as ps

    out["dp"] = ps.get_data_parallel_world_size()
    second = run(["--load", d])
    out["resumed"] = {**first.losses, **second.losses}
    out["resumed_from"] = second.start_iteration

    # The same resume without giving each parameter its own `step`.
    fix = mo._unshare_adam_step
    mo._unshare_adam_step = lambda optimizer: None
    try:
        out["shared_step"] = run(["--load", d]).losses
    finally:
        mo._unshare_adam_step = fix
    dist.barrier()
    return out


def test_distributed_optimizer_exact_resume(manifest, tmp_path):
    out = run_distributed(_world, 4, manifest, str(tmp_path), timeout=280)[-1]
    straight, resumed = out["straight"], out["resumed"]
    assert out["dp"] == 2 and out["resumed_from"] == 2
    assert sorted(straight) == [1, 2, 3, 4]
    assert straight == resumed, (straight, resumed)  # bitwise
    # Without the repair the loaded weights are right (iteration 3's loss) but the first step after loading is not.
    bad = out["shared_step"]
    assert bad[3] == straight[3] and abs(bad[4] - straight[4]) > 1e-4, (bad, straight)


def _killed_save(rank, world, manifest, ckpt):
    mod = _script()
    calls = {"n": 0}

    def after_write():
        calls["n"] += 1
        if calls["n"] == 2 and rank == 1:  # the iteration-4 save: die with its shards written, uncommitted
            os.kill(os.getpid(), signal.SIGKILL)

    mod.pretrain(mod.train_valid_test_datasets_provider, mod.model_provider, mod.forward_step,
                 extra_args_provider=mod.extra_args_provider,
                 argv=_argv(manifest, tp=1, u=2, r=1, iters=4, extra=DISTOPT + ["--save", ckpt, "--save-interval", "2"]),
                 hooks={"after_write": after_write})


def _resume_after_kill(rank, world, manifest, ckpt):
    mod = _script()
    res = mod.pretrain(mod.train_valid_test_datasets_provider, mod.model_provider, mod.forward_step,
                       extra_args_provider=mod.extra_args_provider,
                       argv=_argv(manifest, tp=1, u=2, r=1, iters=4, extra=DISTOPT + ["--save", ckpt, "--load", ckpt]))
    return {"start": res.start_iteration, "losses": res.losses}


def test_distributed_optimizer_killed_save(manifest, tmp_path):
    import math

    ckpt = str(tmp_path / "ckpt")
    with pytest.raises(DistributedRunError):  # the killed rank, or its peers losing it, fail the world
        run_distributed(_killed_save, 4, manifest, ckpt, timeout=150)
    assert read_tracker(ckpt) == 2
    assert os.path.isdir(os.path.join(ckpt, ".iter_0000004.partial"))
    assert not os.path.exists(os.path.join(ckpt, "iter_0000004"))
    out = run_distributed(_resume_after_kill, 4, manifest, ckpt, timeout=150)[-1]
    assert out["start"] == 2 and sorted(out["losses"]) == [3, 4]
    assert all(math.isfinite(v) for v in out["losses"].values())
    assert read_tracker(ckpt) == 4
    assert not os.path.exists(os.path.join(ckpt, ".iter_0000004.partial"))
