"""Checkpoints carry a record of their model; saves survive a crash while re-saving; the project's files unpickle
nothing but plain data.

- The record: `iter_N/model_record.json` describes the saved model (LLM and encoder shapes, padded vocabulary,
  RoPE, tokenizer facts). A run that loads the checkpoint without --llm / --vision-encoder builds that model; an
  explicit flag for another shape is an error naming both values, before any tensor is read; RoPE changes only
  through --rotary-base (noted once).
- Re-saving an existing iteration: a crash after the committed copy was moved aside leaves it loadable, and the
  next save restores it instead of deleting it.
- A crafted pickle in `extra/` is refused (weights_only) with a message naming the file.
"""

import json
import os
import pickle

import pytest

from megatron_longvila.models.record import compare_records, ModelRecord, read_model_record, record_of
from megatron_longvila.errors import RecordMismatch
from megatron_longvila.errors import DistributedRunError
from megatron_longvila.parallel.launch import run_distributed
from megatron_longvila.errors import CheckpointError
from megatron_longvila.checkpoint.layout import checkpoint_dir, read_tracker, safe_load

from .test_training import _argv, _script, manifest  # noqa: F401  (the fixture)

pytest.importorskip("av")


def _run(argv, hooks=None):
    mod = _script()
    return mod.pretrain(mod.train_valid_test_datasets_provider, mod.model_provider, mod.forward_step,
                        extra_args_provider=mod.extra_args_provider, argv=argv, hooks=hooks)


def _no_model_flags(argv):
    """argv without --llm / --vision-encoder (the model must come from the checkpoint)."""
    out, skip = [], 0
    for a in argv:
        if skip:
            skip -= 1
            continue
        if a in ("--llm", "--vision-encoder"):
            skip = 1
            continue
        out.append(a)
    return out


def _record_world(rank, world, manifest, tmp):
    ckpt = os.path.join(tmp, "ckpt")
    base = _argv(manifest, tp=1, u=2, r=1, iters=2, extra=["--save", ckpt, "--save-interval", "2"])
    first = _run(base)
    out = {"first": first.losses}
    # Resume from the checkpoint with no model flags: the record says what to build.
    more = _no_model_flags(_argv(manifest, tp=1, u=2, r=1, iters=3, extra=["--load", ckpt]))
    out["resumed"] = _run(more).losses
    # An explicit flag for another shape: an error before any tensor is read.
    try:
        argv = _argv(manifest, tp=1, u=2, r=1, iters=3, extra=["--load", ckpt])
        _run([a if a != "tiny" else "llama3_8b" for a in argv])  # --llm llama3_8b
    except RecordMismatch as e:
        out["mismatch"] = str(e)
    # RoPE: a different theta only on purpose.
    out["rope"] = _run(_argv(manifest, tp=1, u=2, r=1, iters=3,
                             extra=["--load", ckpt, "--rotary-base", "20000", "--no-load-optim"])).losses
    return out


def test_checkpoint_record_builds_and_guards_the_model(manifest, tmp_path):
    out = run_distributed(_record_world, 2, manifest, str(tmp_path), timeout=240)[-1]
    ckpt = os.path.join(str(tmp_path), "ckpt")
    rec = read_model_record(checkpoint_dir(ckpt, 2))
    assert rec is not None and rec.version == 2
    assert rec.llm["hidden_size"] == 48 and rec.vision["hidden_size"] == 32  # the tiny shapes
    assert rec.padded_vocab_size % 128 == 0 and rec.padded_vocab_size >= rec.llm["vocab_size"]
    assert rec.tokenizer["media_token_id"] is not None and rec.registry_names == {"llm": "tiny",
                                                                                "vision": "siglip_tiny"}
    assert sorted(out["resumed"]) == [3]
    msg = out["mismatch"]
    assert "llm.hidden_size: checkpoint" in msg and "48" in msg and "4096" in msg, msg
    assert sorted(out["rope"]) == [3]


def test_compare_records_names_both_values_and_rope_rule():
    from megatron_longvila.models.registry import ENCODERS, LLMS

    a = record_of(LLMS["tiny"], ENCODERS["siglip_tiny"], real_vocab_size=90)
    b = ModelRecord.from_json(a.to_json())
    assert compare_records(a, b) == []
    b.llm["num_layers"] = 3
    with pytest.raises(RecordMismatch, match=r"llm.num_layers: checkpoint 2, this run 3"):
        compare_records(a, b)
    c = ModelRecord.from_json(a.to_json())
    c.rope_theta = 5e5
    with pytest.raises(RecordMismatch, match="RoPE changes only on purpose"):
        compare_records(a, c)
    notes = compare_records(a, c, rope_change="--rotary-base")
    assert len(notes) == 1 and "500000" in notes[0] and "--rotary-base" in notes[0]
    newer = json.loads(a.to_json())
    newer["version"] = 99
    with pytest.raises(RecordMismatch, match="version 99"):
        ModelRecord.from_dict(newer)


def _resave_world(rank, world, manifest, tmp):
    ckpt = os.path.join(tmp, "ckpt")
    argv = _argv(manifest, tp=1, u=1, r=1, iters=2, extra=["--save", ckpt, "--save-interval", "2"])
    out = {"first": _run(argv).losses}

    def crash():
        raise KeyboardInterrupt("killed between moving iter_0000002 aside and renaming the new copy")

    try:  # the same iteration saved again (a re-run of the step) and killed half-way
        _run(argv, hooks={"after_move_old": crash})
    except KeyboardInterrupt:
        out["crashed"] = True
    out["after_crash"] = sorted(os.listdir(ckpt))
    # The committed copy still loads...
    out["resumed"] = _run(_argv(manifest, tp=1, u=1, r=1, iters=3, extra=["--load", ckpt])).losses
    # ...and the next save of that iteration restores it first, never deleting the only copy.
    out["second"] = _run(argv).losses
    out["after_resave"] = sorted(os.listdir(ckpt))
    return out


def test_crash_while_resaving_an_iteration_keeps_the_committed_copy(manifest, tmp_path):
    out = run_distributed(_resave_world, 1, manifest, str(tmp_path), timeout=240)[0]
    assert out["crashed"]
    assert "iter_0000002.old" in out["after_crash"] and "iter_0000002" not in out["after_crash"]
    assert sorted(out["resumed"]) == [3]
    assert out["second"] == out["first"]  # the re-run from scratch repeats the first run exactly
    assert "iter_0000002" in out["after_resave"] and "iter_0000002.old" not in out["after_resave"]
    ckpt = os.path.join(str(tmp_path), "ckpt")
    assert read_tracker(ckpt) == 2


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/longvila_pwned",))


def test_crafted_pickle_in_a_checkpoint_is_refused(tmp_path):
    import torch

    path = str(tmp_path / "rank_00000.pt")
    torch.save({"rng": _Evil()}, path)
    with pytest.raises(CheckpointError, match="rank_00000.pt"):
        safe_load(path)
    with open(path, "wb") as f:
        pickle.dump({"data": _Evil()}, f)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        safe_load(path)
    assert not os.path.exists("/tmp/longvila_pwned")


def test_crafted_pickle_stops_a_resume(manifest, tmp_path):
    import torch

    ckpt = os.path.join(str(tmp_path), "ckpt")
    run_distributed(_save_only, 1, manifest, ckpt, timeout=200)
    target = os.path.join(checkpoint_dir(ckpt, 2), "extra", "rank_00000.pt")
    torch.save({"data": _Evil()}, target)
    # The manifest would refuse the changed file before reading it (tests/faults); without one (an older
    # checkpoint) the unpickler must still refuse it.
    os.remove(os.path.join(checkpoint_dir(ckpt, 2), "manifest.json"))
    with pytest.raises(DistributedRunError, match="refused to unpickle"):
        run_distributed(_resume_only, 1, manifest, ckpt, timeout=200)


def _save_only(rank, world, manifest, ckpt):
    _run(_argv(manifest, tp=1, u=1, r=1, iters=2, extra=["--save", ckpt, "--save-interval", "2"]))


def _resume_only(rank, world, manifest, ckpt):
    _run(_argv(manifest, tp=1, u=1, r=1, iters=3, extra=["--load", ckpt]))
