"""The pieces of the fault handling that need no launch: manifests, shares, retention, injection specs, flags."""

import os
import zlib

import pytest

from megatron_longvila.checkpoint import integrity
from megatron_longvila.errors import ArgumentError
from megatron_longvila.training.arguments import parse_args
from megatron_longvila.training.faults import INJECT_ENV, injections_from_env


def _folder(tmp_path, sizes):
    d = tmp_path / "iter_0000002"
    (d / "extra").mkdir(parents=True)
    for rel, n in sizes.items():
        (d / rel).write_bytes(bytes((i * 7 + len(rel)) % 251 for i in range(n)))
    return str(d)


def test_manifest_names_missing_truncated_and_changed_files(tmp_path):
    d = _folder(tmp_path, {"__0_0.distcp": 5000, "__1_0.distcp": 3000, "extra/rank_00000.pt": 100, ".metadata": 10})
    algo = integrity.checksum_name()
    entries = integrity.entries_for(d, integrity.owned_files(d, 1), algo, rank=1)
    assert list(entries) == ["__1_0.distcp"]
    integrity.write_manifest(d, 2, entries, algo)  # rank 0 hashes everything nobody claimed
    m = integrity.read_manifest(d)
    assert sorted(m["files"]) == [".metadata", "__0_0.distcp", "__1_0.distcp", "extra/rank_00000.pt"]
    assert m["files"]["__1_0.distcp"]["rank"] == 1 and m["files"][".metadata"]["rank"] == 0
    assert integrity.problems(d, m) == []
    with open(os.path.join(d, "__0_0.distcp"), "r+b") as f:
        f.truncate(4000)
    with open(os.path.join(d, "__1_0.distcp"), "r+b") as f:
        f.seek(1500)
        b = f.read(1)
        f.seek(1500)
        f.write(bytes([b[0] ^ 0x80]))
    os.remove(os.path.join(d, "extra", "rank_00000.pt"))
    found = dict(integrity.problems(d, m))
    assert found["__0_0.distcp"] == "4000 bytes, the manifest says 5000 (truncated)"
    assert "the bytes changed" in found["__1_0.distcp"] and found["extra/rank_00000.pt"] == "missing"
    assert "__1_0.distcp" not in dict(integrity.problems(d, m, checksums=False))  # sizes only
    report = integrity.check_checkpoint(d)
    assert not report["ok"] and {p["file"] for p in report["problems"]} == set(found)


def test_checksums_are_the_standard_ones(tmp_path):
    data = os.urandom(3 << 20)
    p = tmp_path / "f"
    p.write_bytes(data)
    assert integrity.hash_file(str(p), "crc32") == f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"
    assert integrity.hash_bytes(b"123456789", "crc32") == "cbf43926"
    pytest.importorskip("crc32c")
    assert integrity.hash_bytes(b"123456789", "crc32c") == "e3069283"  # the CRC-32C check value
    assert integrity.hash_file(str(p), "crc32c") == integrity.hash_bytes(data, "crc32c")


def test_share_gives_every_file_to_exactly_one_rank():
    sizes = [900, 10, 500, 500, 40, 7, 300, 1]
    m = {"files": {f"f{i}": {"size": s} for i, s in enumerate(sizes)}}
    for world in (1, 2, 3, 8, 11):
        shares = [integrity.share(m, r, world) for r in range(world)]
        assert sorted(f for s in shares for f in s) == sorted(m["files"])
        loads = [sum(m["files"][f]["size"] for f in s) for s in shares]
        assert max(loads) <= max(sizes) + sum(sizes) / world  # greedy largest-first balance


def test_retention_keeps_the_newest(tmp_path):
    root = str(tmp_path)
    for it in (2, 4, 6, 8):
        os.makedirs(os.path.join(root, f"iter_{it:07d}"))
    os.makedirs(os.path.join(root, ".iter_0000001.deleting"))  # a crash mid-delete
    removed = integrity.apply_retention(root, keep=2, protect=8)
    assert sorted(os.path.basename(r) for r in removed) == ["iter_0000002", "iter_0000004"]
    assert sorted(os.listdir(root)) == ["iter_0000006", "iter_0000008"]
    assert integrity.apply_retention(root, keep=5, protect=8) == []


def test_injection_spec(monkeypatch):
    monkeypatch.setenv(INJECT_ENV, "nan_loss@3:rank=1:mb=1, fsize@4:rank=0:bytes=2000")
    a, b = injections_from_env()
    assert (a.kind, a.iteration, a.rank, a.microbatch) == ("nan_loss", 3, 1, 1)
    assert (b.kind, b.iteration, b.rank, b.nbytes) == ("fsize", 4, 0, 2000)
    monkeypatch.setenv(INJECT_ENV, "nan_los@3:rank=1")
    with pytest.raises(ValueError, match="unknown fault 'nan_los'"):
        injections_from_env()
    monkeypatch.delenv(INJECT_ENV)
    assert injections_from_env() == []


@pytest.mark.parametrize("extra, flag", [
    (["--max-skipped-nonfinite-steps", "2", "--no-check-for-nan-in-loss-and-grad"], "--no-check-for-nan"),
    (["--save-retain", "0"], "--save-retain"),
    (["--watchdog-min-seconds", "1", "--watchdog-interval", "1"], "--watchdog-min-seconds"),
    (["--distributed-timeout-minutes", "0"], "--distributed-timeout-minutes"),
])
def test_fault_flags_are_checked(extra, flag):
    base = ["--train-iters", "2", "--data-path", "x.jsonl", "--global-batch-size", "2"]
    a = parse_args(base)
    assert a.check_for_nan_in_loss_and_grad and a.max_skipped_nonfinite_steps == 0 and a.watchdog
    assert a.distributed_timeout_minutes == 10 and a.save_retain is None and a.ckpt_verify_checksums
    with pytest.raises(ArgumentError, match=flag):
        parse_args(base + extra)
