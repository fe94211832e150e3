"""The data feed (training/data_feed.py) on CPU ranks: one data decision per replica, the producer, the agreement.

- At the demo's sizes (its flags and videos, the 2x2 MM-SP mesh on 4 ranks): 6 steps with --num-workers 0 and the
  same 6 steps as 3 with --num-workers 2, saved, then resumed for 3 with --num-workers 1 give bitwise equal losses;
  every iteration's metrics object carries data_wait_s (the first included) and nothing else is in the file.
- One rank alone cannot read some of the videos its peers read (runtime/file_view's test-only injection): the run
  trains to its end, every rank blanks and drops the same documents, only that rank names the files.
- DALI's CPU decoder from training (--decode-backend dali_cpu) on the demo's clips encoded as VP9: it decodes every
  frame (PyAV none) and the losses match PyAV's decode of the same clips (the decoders agree within a grey level).
- From webdataset shards (--data-path a folder of .tar files) the reader reads, the others extract the media they
  decode from the same shards: the losses equal (bitwise) training on the manifest the shards were written from, and
  no extracted media stay behind.
- An injected disagreement (two ranks of one replica holding different sequences) stops at the fingerprint with a
  message naming both ranks and the first sample where they differ; the reader raises it, its peer ends quietly.
"""

import json
import logging
import os

import pytest
import torch

from megatron_longvila.errors import DataDisagreement, FaultExit
from megatron_longvila.parallel.launch import run_distributed

from .example_script import load_example_script

HIDDEN = "*clip_00[0-5].mp4"
"""The videos rank 2 cannot read in the unreadable-files run (its peers can)."""


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    mod = load_example_script()
    return mod.write_demo_dataset(str(tmp_path_factory.mktemp("feed_data")), num_videos=16)


def _demo_argv(manifest, iters, extra=()):
    mod = load_example_script()
    argv = list(mod.DEMO_FLAGS)
    argv[argv.index("--train-iters") + 1] = str(iters)
    argv[argv.index("--lr-warmup-iters") + 1] = "1"
    at = argv.index("--save-interval")  # the demo saves into its folder; these runs save only where told
    del argv[at:at + 2]
    return argv + ["--data-path", manifest, "--log-interval", "100", *extra]


def _runs(rank, world, manifest, tmp):
    from megatron_longvila.runtime import file_view

    mod = load_example_script()
    state = {}

    def run(argv, hooks=None):
        res = mod.pretrain(mod.train_valid_test_datasets_provider, mod.model_provider, mod.forward_step,
                           extra_args_provider=mod.extra_args_provider, argv=argv, hooks=hooks)
        state["step"] = mod._STATE["step"]
        return res

    out = {}
    metrics = os.path.join(tmp, "straight.jsonl")
    out["straight"] = run(_demo_argv(manifest, 6, ["--num-workers", "0", "--metrics-file", metrics])).losses
    save = os.path.join(tmp, "ckpt")
    first = run(_demo_argv(manifest, 6, ["--num-workers", "2", "--save", save, "--save-interval", "3"]),
                hooks={"stop_after": 3})
    second = run(_demo_argv(manifest, 6, ["--num-workers", "1", "--load", save]))
    out["resumed"] = {**first.losses, **second.losses}
    out["resumed_from"] = second.start_iteration
    if rank == world - 1:
        out["metrics"] = [json.loads(line) for line in open(metrics)]

    # Rank 2 alone cannot read some videos (an I/O error, as from a failing network file system).
    os.environ[file_view.HIDE_ENV] = f"eio@2:{HIDDEN}"
    file_view._rules = None
    told = []

    class Keep(logging.Handler):  # this rank's log (a forkserver's children may write to an earlier test's stderr)
        def emit(self, record):
            told.append(record.getMessage())

    handler = Keep(level=logging.WARNING)
    logging.getLogger("megatron_longvila.training").addHandler(handler)
    try:
        res = run(_demo_argv(manifest, 3, ["--num-workers", "1"]))
    finally:
        del os.environ[file_view.HIDE_ENV]
        file_view._rules = None
        logging.getLogger("megatron_longvila.training").removeHandler(handler)
    out["told"] = [m for m in told if "could not read" in m]
    out["unreadable_losses"] = res.losses
    out["blanked"] = state["step"].blanked_media
    return out


def test_workers_resume_and_one_rank_that_cannot_read(demo_data, tmp_path):
    results = run_distributed(_runs, 4, demo_data, str(tmp_path), timeout=280)
    last = results[-1]
    assert sorted(last["straight"]) == list(range(1, 7))
    assert last["resumed_from"] == 3
    # Bitwise: --num-workers 0, 2 (saved at 3) and 1 (resumed) train on the same sequences in the same order.
    assert last["straight"] == last["resumed"], (last["straight"], last["resumed"])
    rows = last["metrics"]
    assert [r["iteration"] for r in rows] == list(range(1, 7))
    assert all(isinstance(r["data_wait_s"], float) and r["data_wait_s"] >= 0 for r in rows)
    assert all({"iteration", "loss", "grad_norm"} <= set(r) for r in rows)

    # The unreadable run trained to its end; every rank blanked the same media (agreed over the replica).
    assert sorted(last["unreadable_losses"]) == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(v)) for v in last["unreadable_losses"].values())
    blanked = {r["blanked"] for r in results}
    assert len(blanked) == 1 and blanked.pop() > 0, [r["blanked"] for r in results]
    # Only rank 2 tells, naming the file and the sample.
    assert [bool(r["told"]) for r in results] == [False, False, True, False], [r["told"] for r in results]
    told = results[2]["told"]
    assert all(m.startswith("rank 2 could not read") for m in told), told
    assert all("clip_00" in m and "(sample 'clip_00" in m for m in told), told


def _disagree(rank, world):
    from megatron_longvila.data.sample import MediaItem
    from megatron_longvila.parallel.groups import host_group_by
    from megatron_longvila.training.data_feed import StepFeed, fingerprint

    class Packed:  # what the fingerprint reads of a packed sequence
        def __init__(self, ids):
            self.sample_ids, self.seq_lens = ids, [5] * len(ids)
            self.media = [MediaItem("video", "/v/a.mp4", [0, 3], [0, 1], 1)]

    feed = StepFeed.__new__(StepFeed)
    feed.group, feed.replica = host_group_by(0, tag="test")
    feed.reader, feed.rank = feed.replica[0], rank
    feed.is_reader = rank == feed.reader
    seqs = [Packed(["s0", "s1"]), Packed(["s2", "s3" if rank == 0 else "s9"])]  # injected: rank 1's second sequence
    try:
        feed._agree(fingerprint(seqs), seqs, [torch.zeros(1), torch.zeros(1)])
    except (DataDisagreement, FaultExit) as e:
        return type(e).__name__, str(e) if isinstance(e, DataDisagreement) else e.message
    return None, None


def test_injected_disagreement_stops_at_the_fingerprint():
    (kind0, msg0), (kind1, msg1) = run_distributed(_disagree, 2, timeout=60)
    assert kind0 == "DataDisagreement" and kind1 == "FaultExit"
    assert msg0 == msg1
    assert "rank 0 would train on sample 's3' and rank 1 on 's9' (micro-batch 1, document 1)" in msg0, msg0


def _dali_runs(rank, world, manifest):
    from megatron_longvila.data import video

    mod = load_example_script()
    calls = {"dali": 0}
    original = video._decode_dali

    def counted(*a, **k):
        calls["dali"] += 1
        return original(*a, **k)

    video._decode_dali = counted
    out = {}
    for backend in ("dali_cpu", "pyav"):
        video.DECODE_STATS.clear()
        calls["dali"] = 0
        argv = ["--cpu", "--recipe", "pretrain", "--vision-encoder", "siglip_tiny", "--llm", "tiny",
                "--context-parallel-size", "2", "--hierarchical-context-parallel-sizes", "2", "1", "--seq-length",
                "512", "--global-batch-size", "2", "--train-iters", "2", "--lr", "3e-3", "--lr-warmup-iters", "1",
                "--num-frames", "2", "--seed", "1234", "--data-path", manifest, "--log-interval", "100",
                "--decode-backend", backend, "--num-workers", "2"]
        res = mod.pretrain(mod.train_valid_test_datasets_provider, mod.model_provider, mod.forward_step,
                           extra_args_provider=mod.extra_args_provider, argv=argv)
        out[backend] = {"losses": res.losses, "dali_calls": calls["dali"],
                        "pyav_decoded": video.DECODE_STATS["decoded"]}
    return out


def test_dali_cpu_decoder_trains(tmp_path):
    manifest = load_example_script().write_demo_dataset(str(tmp_path / "vp9"), num_videos=8, codec="vp9")
    out = run_distributed(_dali_runs, 2, manifest, timeout=240)[-1]
    dali, pyav = out["dali_cpu"], out["pyav"]
    assert dali["dali_calls"] > 0 and dali["pyav_decoded"] == 0, dali
    assert pyav["dali_calls"] == 0 and pyav["pyav_decoded"] > 0, pyav
    assert sorted(dali["losses"]) == [1, 2]
    for it in (1, 2):  # the same frames within a grey level: the same loss to 1e-3
        assert abs(dali["losses"][it] - pyav["losses"][it]) <= 1e-3 * abs(pyav["losses"][it]), out


def _shard_runs(rank, world, manifest, shards):
    import glob
    import tempfile

    mod = load_example_script()
    caches = os.path.join(tempfile.gettempdir(), "longvila_shards_*")
    before = set(glob.glob(caches))
    out = {}
    for name, data in (("manifest", manifest), ("shards", shards)):
        argv = ["--cpu", "--recipe", "pretrain", "--vision-encoder", "siglip_tiny", "--llm", "tiny",
                "--context-parallel-size", "2", "--hierarchical-context-parallel-sizes", "2", "1", "--seq-length",
                "512", "--global-batch-size", "2", "--train-iters", "2", "--lr", "3e-3", "--lr-warmup-iters", "1",
                "--num-frames", "2", "--seed", "1234", "--data-path", data, "--log-interval", "100"]
        out[name] = mod.pretrain(mod.train_valid_test_datasets_provider, mod.model_provider, mod.forward_step,
                                 extra_args_provider=mod.extra_args_provider, argv=argv).losses
    import torch.distributed as dist

    dist.barrier()  # every rank has ended its run
    out["left"] = sorted(set(glob.glob(caches)) - before)  # each rank's extraction cache is removed at the end
    return out


def test_training_from_shards_equals_the_manifest(tmp_path):
    from megatron_longvila.data.energon import write_shards
    from megatron_longvila.data.manifest import Manifest

    manifest = load_example_script().write_demo_dataset(str(tmp_path / "data"), num_videos=8)
    m = Manifest(manifest)
    write_shards([m.record(i) for i in range(len(m))], str(tmp_path / "shards"), samples_per_shard=3)
    results = run_distributed(_shard_runs, 2, manifest, str(tmp_path / "shards"), timeout=240)
    last = results[-1]
    assert sorted(last["shards"]) == [1, 2]
    assert last["shards"] == last["manifest"], last
    assert all(not r["left"] for r in results), [r["left"] for r in results]


def test_compact_broadcast_form_is_exact():
    from megatron_longvila.data.packing import concat_samples
    from megatron_longvila.data.sample import IGNORE_INDEX, MediaItem, Sample
    from megatron_longvila.training.data_feed import compact, expand

    g = torch.Generator().manual_seed(0)

    def sample(n, w, sid):
        ids = torch.randint(0, 150000, (n,), generator=g)
        labels = torch.where(torch.rand(n, generator=g) < 0.5, ids, torch.full_like(ids, IGNORE_INDEX))
        return Sample(ids, labels, [MediaItem("video", f"/v/{sid}.mp4", [0, 4], [1, 2], 1)], loss_weight=w,
                      sample_id=sid)

    for weighting in ("token", "sample"):
        p = concat_samples([sample(37, 1.0, "a"), sample(5, 0.3, "b"), sample(64, 2.5, "c")], loss_weighting=weighting)
        d = compact(p)
        assert d["input_ids"].dtype == torch.int32 and d["labels"].dtype == torch.bool and d["position_ids"] is None
        assert isinstance(d["loss_weights"], tuple)
        q = expand(d)
        for name in ("input_ids", "labels", "position_ids", "loss_weights"):
            assert torch.equal(getattr(p, name), getattr(q, name)) and getattr(q, name).dtype == getattr(p, name).dtype
        assert (q.seq_lens, q.sample_ids, q.media) == (p.seq_lens, p.sample_ids, p.media)
    # Forms that do not fit are sent whole: labels that are not the ids, positions that do not restart, a document
    # with two weights.
    p.labels[3] = 7 if p.input_ids[3] != 7 else 8
    p.position_ids[0] = 5
    p.loss_weights[40:42] = torch.tensor([0.5, 0.25])
    d = compact(p)
    assert d["labels"] is p.labels and d["position_ids"] is p.position_ids and d["loss_weights"] is p.loss_weights
    q = expand(d)
    assert all(torch.equal(getattr(p, n), getattr(q, n)) for n in ("labels", "position_ids", "loss_weights"))
