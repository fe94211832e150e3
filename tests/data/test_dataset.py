import json
import logging
import os

import pytest
import torch

from megatron_longvila.data.dataset import DataConfig, PackedIterator, VideoTextDataset, decode_media, frame_keys
from megatron_longvila.data.energon import ShardSource, write_shards
from megatron_longvila.errors import SkipThresholdExceeded
from megatron_longvila.data.image_processor import SiglipImageProcessor
from megatron_longvila.data.manifest import Manifest
from megatron_longvila.data.video import decode_frames

pytest.importorskip("av", reason="PyAV (pip install av) is needed to probe the test videos")

QA = [{"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "A dog runs."}]


def _line(id_, **kw):
    return json.dumps({"id": id_, "conversations": QA if "video" in kw else QA_TEXT, **kw})


QA_TEXT = [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi there."}]


def write_mixed_manifest(folder, videos):
    """Good samples g*, and one bad sample of each kind with its expected reason."""
    rel = lambda k: os.path.relpath(videos[k], folder)  # noqa: E731  relative paths resolve against the folder
    good = [
        _line("g_h264", video=rel("h264"), num_frames=4),
        _line("g_vp9", video=videos["vp9"], fps=6.0),
        _line("g_text"),
        json.dumps({"id": "g_image", "image": videos["image"], "conversations": [
            {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A red square."}]}),
        json.dumps({"id": "g_images", "image": [videos["image"], videos["image2"]], "conversations": [
            {"from": "human", "value": "Compare."}, {"from": "gpt", "value": "Different."}]}),
        _line("g_span", video=videos["h264"], num_frames=3, start_s=0.5, end_s=1.5),
    ]
    bad = {
        "b_missing": (_line("b_missing", video="nope.mp4"), "missing_file"),
        "b_empty": (_line("b_empty", video=videos["empty"]), "empty_file"),
        "b_corrupt": (_line("b_corrupt", video=videos["corrupt"]), "corrupt_video"),
        "b_trunc": (_line("b_trunc", video=videos["truncated_mp4"]), "truncated_video"),
        "b_zero": (_line("b_zero", video=videos["zero"]), "zero_frames"),
        "b_codec": (_line("b_codec", video=videos["png"]), "unsupported_codec"),
        "b_long": (_line("b_long", video=videos["h264_long"]), "too_long"),
        "b_json": ('{"id": "b_json", "video": ', "malformed_manifest"),
        "b_noasst": (json.dumps({"id": "b_noasst", "conversations": [{"from": "human", "value": "hi"}]}), "no_assistant_turn"),
        "b_utf8": (None, "undecodable_text"),
        "b_image": (json.dumps({"id": "b_image", "image": videos["corrupt_image"], "conversations": QA_TEXT}), "corrupt_image"),
    }
    path = os.path.join(folder, "mixed.jsonl")
    with open(path, "wb") as f:
        lines = [g.encode() for g in good]
        bad_lines = [(b'{"id": "b_utf8", "conversations": "\xff\xfe"}' if v[0] is None else v[0].encode()) for v in bad.values()]
        # Interleave good and bad lines, with a blank line that is not a sample.
        order = []
        for i in range(max(len(good), len(bad_lines))):
            if i < len(good):
                order.append(lines[i])
            if i < len(bad_lines):
                order.append(bad_lines[i])
        order.insert(3, b"   ")
        f.write(b"\n".join(order) + b"\n")
    expected_skips = {}
    for _, reason in bad.values():
        expected_skips[reason] = expected_skips.get(reason, 0) + 1
    return path, [json.loads(g)["id"] for g in good], expected_skips


@pytest.fixture()
def mixed(tmp_path, videos):
    return write_mixed_manifest(str(tmp_path), videos)


def _config(**kw):
    base = dict(tokens_per_frame=2, num_frames=4, max_video_frames=100, shuffle=False, max_skip_fraction=1.0)
    base.update(kw)
    return DataConfig(**base)


def test_mixed_manifest_yields_exactly_the_good_samples(mixed, tokenizer, caplog):
    path, good_ids, expected_skips = mixed
    ds = VideoTextDataset(path, tokenizer, _config())
    with caplog.at_level(logging.WARNING, logger="megatron_longvila.data"):
        samples = list(ds)
    assert [s.sample_id for s in samples] == good_ids
    assert ds.summary() == {"ok": len(good_ids), "skipped": dict(sorted(expected_skips.items()))}
    # Logged once per reason.
    assert len([r for r in caplog.records if "skipping sample" in r.message]) == len(expected_skips)

    by_id = {s.sample_id: s for s in samples}
    assert by_id["g_h264"].media[0].frame_indices == [0, 16, 31, 47]
    assert by_id["g_vp9"].media[0].frame_indices == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44]  # 6 of 24 fps
    assert by_id["g_span"].media[0].frame_indices == [12, 24, 35]  # frames 12..35 lie in [0.5 s, 1.5 s) at 24 fps
    assert [m.kind for m in by_id["g_images"].media] == ["image", "image"]
    assert by_id["g_text"].media == []

    # A good sample is the same whether or not bad lines surround it.
    alone = os.path.join(os.path.dirname(path), "alone.jsonl")
    with open(alone, "w") as f:
        f.write(_line("g_h264", video=os.path.relpath(by_id["g_h264"].media[0].path, os.path.dirname(path)), num_frames=4) + "\n")
    (s,) = list(VideoTextDataset(alone, tokenizer, _config()))
    assert torch.equal(s.input_ids, by_id["g_h264"].input_ids) and torch.equal(s.labels, by_id["g_h264"].labels)


def test_skip_threshold_stops_early(mixed, tokenizer):
    path, _, _ = mixed
    ds = VideoTextDataset(path, tokenizer, _config(max_skip_fraction=0.2, min_samples_for_skip_check=5))
    with pytest.raises(SkipThresholdExceeded, match="max_skip_fraction"):
        list(ds)
    assert sum(ds.skipped.values()) + ds.ok < len(ds)  # stopped before the end


def test_loss_weights_by_kind(mixed, tokenizer):
    path, _, _ = mixed
    ds = VideoTextDataset(path, tokenizer, _config(video_loss_weight=2.0, text_loss_weight=0.5))
    weights = {s.sample_id: s.loss_weight for s in ds}
    assert weights["g_h264"] == 2.0 and weights["g_image"] == 2.0 and weights["g_text"] == 0.5


def test_resume_sees_the_same_samples(mixed, tokenizer):
    path, _, _ = mixed
    cfg = _config(shuffle=True, seed=7)
    full = VideoTextDataset(path, tokenizer, cfg)
    reference = [s.sample_id for s in full] + [s.sample_id for s in full]  # two epochs

    ds = VideoTextDataset(path, tokenizer, cfg)
    it = iter(ds)
    first = [next(it).sample_id for _ in range(4)]
    state = json.loads(json.dumps(ds.state_dict()))  # survives a checkpoint round trip
    resumed = VideoTextDataset(path, tokenizer, cfg)
    resumed.load_state_dict(state)
    rest = [s.sample_id for s in resumed] + [s.sample_id for s in resumed]
    assert first + rest == reference
    assert reference[: len(reference) // 2] != reference[len(reference) // 2 :]  # a new order each epoch
    with pytest.raises(ValueError, match="seed"):
        VideoTextDataset(path, tokenizer, _config(shuffle=True, seed=8)).load_state_dict(state)


def test_dp_ranks_split_the_samples(mixed, tokenizer):
    path, good_ids, _ = mixed
    parts = [[s.sample_id for s in VideoTextDataset(path, tokenizer, _config(), dp_rank=r, dp_size=2)] for r in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(good_ids) and not set(parts[0]) & set(parts[1])


def test_packed_iterator_resumes_exactly(mixed, tokenizer):
    path, _, _ = mixed
    cfg = _config(max_seq_len=120)
    it = iter(PackedIterator(VideoTextDataset(path, tokenizer, cfg), 120))
    reference = [next(it) for _ in range(6)]
    pk = PackedIterator(VideoTextDataset(path, tokenizer, cfg), 120)
    it = iter(pk)
    got = [next(it) for _ in range(2)]
    state = pk.state_dict()
    pk2 = PackedIterator(VideoTextDataset(path, tokenizer, cfg), 120)
    pk2.load_state_dict(state)
    it2 = iter(pk2)
    got += [next(it2) for _ in range(4)]
    for a, b in zip(reference, got):
        assert a.sample_ids == b.sample_ids and torch.equal(a.input_ids, b.input_ids)
    assert all(sum(p.seq_lens) <= 120 for p in reference)


def test_decode_media_decodes_only_the_subset(mixed, tokenizer):
    path, _, _ = mixed
    samples = {s.sample_id: s for s in VideoTextDataset(path, tokenizer, _config())}
    s = samples["g_h264"]
    keys = frame_keys(s)
    assert keys == [(0, 0), (0, 1), (0, 2), (0, 3)]
    mine = decode_media(s, [1, 3])  # this rank's frames, as stage 1 would assign them
    assert mine.keys == [(0, 1), (0, 3)]
    want = decode_frames(s.media[0].path, [16, 47])
    assert torch.equal(torch.stack(mine.pixels), want)
    proc = SiglipImageProcessor(size=16)
    out = decode_media(samples["g_images"], None, processor=proc)
    assert out.pixels.shape == (2, 3, 16, 16)


def test_decode_media_blank_on_error(mixed, tokenizer, tmp_path, videos):
    path, _, _ = mixed
    s = next(x for x in VideoTextDataset(path, tokenizer, _config()) if x.sample_id == "g_h264")
    s.media[0].path = str(tmp_path / "vanished.mp4")  # deleted between preparation and decoding
    proc = SiglipImageProcessor(size=8)
    out = decode_media(s, [0, 1], processor=proc, on_error="blank")
    assert out.failed == [(0, 0), (0, 1)] and torch.equal(out.pixels, torch.zeros(2, 3, 8, 8))
    with pytest.raises(Exception, match="missing_file"):
        decode_media(s, [0], processor=proc)


def test_shards_round_trip(mixed, tokenizer, tmp_path):
    path, good_ids, _ = mixed
    manifest = Manifest(path)
    records = [r for r in manifest if not isinstance(r, Exception)]
    # Shards hold readable samples only: keep those whose files exist.
    records = [r for r in records if all(os.path.isfile(m.path) for m in r.media)]
    shards = write_shards(records, tmp_path / "shards", samples_per_shard=4)
    assert len(shards) == -(-len(records) // 4)
    src = ShardSource(str(tmp_path / "shards"))
    try:
        assert len(src) == len(records)
        from_shards = {s.sample_id: s for s in VideoTextDataset(src, tokenizer, _config())}
        from_manifest = {s.sample_id: s for s in VideoTextDataset(path, tokenizer, _config())}
        assert sorted(from_shards) == sorted(good_ids)
        for sid, s in from_manifest.items():
            t = from_shards[sid]
            assert torch.equal(s.input_ids, t.input_ids)
            assert [m.frame_indices for m in s.media] == [m.frame_indices for m in t.media]
            if s.media and s.media[0].kind == "video":
                a = decode_frames(s.media[0].path, s.media[0].frame_indices)
                b = decode_frames(t.media[0].path, t.media[0].frame_indices)
                assert torch.equal(a, b)
    finally:
        src.close()
