"""Our webdataset shards as a real Megatron-Energon dataset: indexed by Energon's prepare, read back by
Energon's own loader (get_train_dataset + get_loader) into exactly what ShardSource reads."""

import dataclasses
import io
import json
import os
import tarfile

import pytest
import torch

pytest.importorskip("megatron.energon", reason="megatron-energon is not installed (pip install megatron-energon)")
pytest.importorskip("av", reason="PyAV (pip install av) is needed to probe the test videos")

from megatron.energon import WorkerConfig, get_loader, get_train_dataset  # noqa: E402

from megatron_longvila.data.dataset import VideoTextDataset  # noqa: E402
from megatron_longvila.data.energon import ShardSource, prepare_energon, write_shards  # noqa: E402
from megatron_longvila.data.energon_loader import LongVILATaskEncoder  # noqa: E402
from megatron_longvila.data.manifest import Manifest  # noqa: E402
from tests.data.test_dataset import _config, write_mixed_manifest  # noqa: E402

# Energon builds a torch DataLoader with pin_memory on; on a CPU-only torch that is only a warning.
pytestmark = pytest.mark.filterwarnings("ignore:.pin_memory. argument")


def _energon_epoch(folder, encoder, n):
    """n samples from Energon's training loader: one pass over the shards (no shuffle buffer)."""
    wc = WorkerConfig(rank=0, world_size=1, num_workers=0)
    ds = get_train_dataset(folder, worker_config=wc, batch_size=None, shuffle_buffer_size=None,
                           max_samples_per_sequence=None, task_encoder=encoder)
    loader = get_loader(ds)
    return [s for _, s in zip(range(n), loader)]


@pytest.fixture
def shards(tmp_path, videos):
    path, good_ids, _ = write_mixed_manifest(str(tmp_path), videos)
    records = [r for r in Manifest(path) if not isinstance(r, Exception)]
    records = [r for r in records if all(os.path.isfile(m.path) for m in r.media)]
    folder = tmp_path / "shards"
    write_shards(records, folder, samples_per_shard=3)
    meta = prepare_energon(folder)
    return str(folder), meta, records


def _strip_paths(rec):
    d = dataclasses.asdict(rec)
    d["media"] = [m["kind"] for m in d["media"]]
    return d


def test_energon_reads_records_like_shard_source(shards):
    folder, meta, records = shards
    assert {"dataset.yaml", "split.yaml", "index.sqlite", ".info.json"} <= set(os.listdir(meta))
    src = ShardSource(folder)
    enc = LongVILATaskEncoder()
    try:
        ours = {r.id: r for r in (src.record(i) for i in range(len(src)))}
        theirs = _energon_epoch(folder, enc, len(src))
        assert sorted(r.id for r in theirs) == sorted(ours) == sorted(r.id for r in records)
        for t in theirs:
            o = ours[t.id]
            assert _strip_paths(t) == _strip_paths(o)
            for mt, mo in zip(t.media, o.media):
                with open(mt.path, "rb") as a, open(mo.path, "rb") as b:
                    assert a.read() == b.read(), t.id
        assert not enc.skipped
    finally:
        src.close()
        enc.close()


def test_energon_tokenized_samples_equal_video_text_dataset(shards, tokenizer):
    folder, _, _ = shards
    src = ShardSource(folder)
    enc = LongVILATaskEncoder(tokenizer, _config())
    try:
        ours = {s.sample_id: s for s in VideoTextDataset(src, tokenizer, _config())}
        theirs = {s.sample_id: s for s in _energon_epoch(folder, enc, len(src))}
        assert sorted(theirs) == sorted(ours) and len(ours) >= 5
        for sid, o in ours.items():
            t = theirs[sid]
            assert torch.equal(t.input_ids, o.input_ids) and torch.equal(t.labels, o.labels), sid
            assert [(m.kind, m.frame_indices) for m in t.media] == [(m.kind, m.frame_indices) for m in o.media]
            assert t.loss_weight == o.loss_weight
    finally:
        src.close()
        enc.close()


def test_energon_skips_bad_samples_by_reason(tmp_path, videos, tokenizer):
    folder = tmp_path / "bad"
    folder.mkdir()
    with tarfile.open(folder / "shard-000000.tar", "w") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        qa = [{"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "Grey."}]
        add("000000000.json", json.dumps({"id": "good", "video": "000000000.mp4", "conversations": qa}).encode())
        with open(videos["h264"], "rb") as f:
            add("000000000.mp4", f.read())
        add("000000001.json", b'{"id": "broken", ')
        add("000000002.json", json.dumps({"id": "corrupt", "video": "000000002.mp4", "conversations": qa}).encode())
        add("000000002.mp4", os.urandom(2048))
    prepare_energon(folder)
    enc = LongVILATaskEncoder(tokenizer, _config())
    try:
        got = _energon_epoch(str(folder), enc, 3)  # the loader repeats: 3 good samples = 3 passes
        assert [s.sample_id for s in got] == ["good"] * 3
        assert set(enc.skipped) == {"malformed_manifest", "corrupt_video"}
    finally:
        enc.close()
