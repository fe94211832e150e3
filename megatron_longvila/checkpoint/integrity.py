"""Checkpoints that cannot lie: a manifest of every file with its size and checksum, verified on load; retention.

    MANIFEST                                  "manifest.json" in each iteration folder
    checksum_name() -> str                    "crc32c" (hardware, when the crc32c package imports) or "crc32" (zlib)
    hash_file(path, algorithm) / hash_bytes(data, algorithm)
    write_bytes(path, data, algorithm) -> entry   write (and fsync) a file, its manifest entry from memory
    owned_files(folder, rank) -> [relpath]    the torch_dist shards this rank wrote (`__<rank>_*.distcp`)
    write_manifest(folder, iteration, entries, algorithm)
    read_manifest(folder) -> dict | None
    problems(folder, files=None, checksums=True) -> [(relpath, problem)]   offline check (or one rank's share)
    share(manifest, rank, world) -> [relpath] a rank's share of the load-time checksums (balanced by size)
    verify_for_load(folder, checksums=True) -> None   every rank checks its share; raises CorruptCheckpoint
    check_checkpoint(folder, checksums=True) -> dict  the offline report (tools/check_checkpoint.py)
    apply_retention(root, keep, protect) -> [removed]

The manifest (written by rank 0 last, before the commit rename): {"version", "iteration", "algorithm",
"files": {relpath: {"size", "checksum", "rank"}}}. Every rank hashes the files it wrote (its torch_dist shards
re-read from the page cache, its `extra/` file from memory while writing); rank 0 hashes the rest (torch_dist's
.metadata, common.pt, metadata.json, train_state.json, model_record.json). On load, every rank checks the size of
its share of the files and, unless --no-ckpt-verify-checksums, its checksum; the ranks agree on the result before
any tensor is read. A checkpoint without a manifest (saved before manifests, or by the conversion tools) is checked
against its torch_dist metadata only (every referenced byte range exists) and loads with a one-line warning.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zlib
from typing import Dict, List, Optional, Tuple

import torch.distributed as dist

from ..errors import CheckpointError, CorruptCheckpoint
from ..parallel.groups import host_group_of
from ..runtime.files import write_text_atomic
from ..runtime.versions import applying
from .layout import committed_iterations

__all__ = ["MANIFEST", "checksum_name", "hash_file", "hash_bytes", "write_bytes", "owned_files", "write_manifest",
           "read_manifest", "problems", "share", "verify_for_load", "check_checkpoint", "apply_retention",
           "agreement_group"]

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_CHUNK = 8 << 20


def agreement_group():
    """A gloo group over the world for host flags of saves and loads, separate from the default group: collectives
    there never pair with a collective megatron-core's writer left half-done on the default group. Collective to
    create (first save or load)."""
    return host_group_of(dist.group.WORLD, separate=True)


# ------------------------------------------------------------------------------------------------------
# Checksums
# ------------------------------------------------------------------------------------------------------

def _crc32c():
    try:
        import crc32c

        return crc32c.crc32c
    except ImportError:
        return None


def checksum_name() -> str:
    """The checksum this installation writes: crc32c (SSE4.2/ARMv8 hardware, ~10 GB/s) when the crc32c package
    imports, else zlib's crc32 (~2 GB/s)."""
    return "crc32c" if _crc32c() is not None else "crc32"


def _update_fn(algorithm: str):
    if algorithm == "crc32":
        return zlib.crc32
    if algorithm == "crc32c":
        fn = _crc32c()
        if fn is None:
            return None
        return lambda data, value=0: fn(data, value)
    raise ValueError(f"unknown checksum {algorithm!r}")


def hash_bytes(data, algorithm: str) -> str:
    return f"{_update_fn(algorithm)(data, 0) & 0xFFFFFFFF:08x}"


def hash_file(path: str, algorithm: str) -> str:
    update = _update_fn(algorithm)
    value = 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            value = update(view[:n], value)
    return f"{value & 0xFFFFFFFF:08x}"


def write_bytes(path: str, data: bytes, algorithm: str, rank: int) -> Tuple[str, dict]:
    """Write a file with plain writes (a full disk or a file-size limit raises OSError naming the cause), fsync it,
    and return its manifest entry, hashed from memory."""
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from None  # name the file: write() errors carry no path
    return path, {"size": len(data), "checksum": hash_bytes(data, algorithm), "rank": rank}


def owned_files(folder: str, rank: int) -> List[str]:
    """The torch_dist shard files rank `rank` wrote in `folder` (torch's and megatron-core's writers name them
    `__<rank>_<n>.distcp`: a naming of torch's, fenced in runtime.versions)."""
    applying("dcp_shard_names")
    prefix = f"__{rank}_"
    return sorted(n for n in os.listdir(folder) if n.startswith(prefix) and n.endswith(".distcp"))


def entries_for(folder: str, relpaths: List[str], algorithm: str, rank: int) -> Dict[str, dict]:
    out = {}
    for rel in relpaths:
        path = os.path.join(folder, rel)
        out[rel] = {"size": os.path.getsize(path), "checksum": hash_file(path, algorithm), "rank": rank}
    return out


def _all_files(folder: str) -> List[str]:
    out = []
    for dirpath, _, names in os.walk(folder):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), folder)
            if rel != MANIFEST and not rel.endswith(".tmp"):
                out.append(rel.replace(os.sep, "/"))
    return sorted(out)


def write_manifest(folder: str, iteration: int, entries: Dict[str, dict], algorithm: str) -> str:
    """Complete the entries with every file nobody hashed yet (hashed here), write manifest.json atomically."""
    entries = dict(entries)
    for rel in _all_files(folder):
        if rel not in entries:
            path = os.path.join(folder, rel)
            entries[rel] = {"size": os.path.getsize(path), "checksum": hash_file(path, algorithm), "rank": 0}
    path = os.path.join(folder, MANIFEST)
    doc = {"version": MANIFEST_VERSION, "iteration": iteration, "algorithm": algorithm,
           "files": dict(sorted(entries.items()))}
    return write_text_atomic(path, json.dumps(doc, indent=1))


def read_manifest(folder: str) -> Optional[dict]:
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            doc = json.load(f)
        if not isinstance(doc.get("files"), dict):
            raise ValueError("no file list")
    except (ValueError, OSError) as e:
        raise CorruptCheckpoint(f"{path} is unreadable ({type(e).__name__}: {e}): the checkpoint cannot be verified") from None
    return doc


# ------------------------------------------------------------------------------------------------------
# Verification
# ------------------------------------------------------------------------------------------------------

def problems(folder: str, manifest: dict, files: Optional[List[str]] = None,
             checksums: bool = True) -> List[Tuple[str, str]]:
    """[(relpath, problem)] for the given manifest files (default: all): missing, wrong size, wrong checksum."""
    out = []
    algorithm = manifest.get("algorithm", "crc32")
    can_hash = checksums and _update_fn(algorithm) is not None
    for rel in (files if files is not None else sorted(manifest["files"])):
        want = manifest["files"][rel]
        path = os.path.join(folder, rel)
        try:
            size = os.path.getsize(path)
        except OSError:
            out.append((rel, "missing"))
            continue
        if size != want["size"]:
            what = "truncated" if size < want["size"] else "longer than written"
            out.append((rel, f"{size} bytes, the manifest says {want['size']} ({what})"))
            continue
        if can_hash:
            got = hash_file(path, algorithm)
            if got != want["checksum"]:
                out.append((rel, f"{algorithm} {got}, the manifest says {want['checksum']} (the bytes changed)"))
    return out


def dcp_problems(folder: str) -> List[Tuple[str, str]]:
    """For a checkpoint without a manifest: every byte range torch_dist's metadata references exists. Reads (unpickles)
    `.metadata`, which torch's own loader does anyway (a torch_dist checkpoint is trusted input)."""
    if not os.path.isfile(os.path.join(folder, ".metadata")):
        return [(".metadata", "missing (not a torch_dist checkpoint, or an incomplete one)")]
    try:
        from torch.distributed.checkpoint import FileSystemReader

        md = FileSystemReader(folder).read_metadata()
    except Exception as e:  # noqa: BLE001  (a corrupt pickle raises anything)
        return [(".metadata", f"unreadable ({type(e).__name__}: {str(e)[:200]})")]
    need: Dict[str, int] = {}
    for info in (md.storage_data or {}).values():
        rel = info.relative_path
        need[rel] = max(need.get(rel, 0), int(info.offset) + int(info.length))
    out = []
    for rel, n in sorted(need.items()):
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            out.append((rel, "missing"))
        elif os.path.getsize(path) < n:
            out.append((rel, f"{os.path.getsize(path)} bytes, torch_dist's metadata reads up to byte {n} (truncated)"))
    return out


def share(manifest: dict, rank: int, world: int) -> List[str]:
    """This rank's files to check on load: the largest first, each to the least-loaded rank (the same answer on
    every rank)."""
    load = [0] * world
    mine = []
    for rel, e in sorted(manifest["files"].items(), key=lambda kv: (-kv[1]["size"], kv[0])):
        r = min(range(world), key=lambda i: (load[i], i))
        load[r] += e["size"]
        if r == rank:
            mine.append(rel)
    return mine


def _describe(found: List[Tuple[str, str]], limit: int = 6) -> str:
    text = "; ".join(f"{rel}: {p}" for rel, p in found[:limit])
    return text + (f"; and {len(found) - limit} more" if len(found) > limit else "")


def verify_for_load(folder: str, checksums: bool = True, *, quiet: bool = False) -> None:
    """Every rank checks its share of `folder` against its manifest; the ranks agree (one host all-gather) and all
    raise the same CheckpointError naming the bad files. No manifest: torch_dist metadata check and a warning."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    local: List[Tuple[str, str]] = []
    manifest = None
    try:
        manifest = read_manifest(folder)
        if manifest is not None:
            local = problems(folder, manifest, share(manifest, rank, world), checksums=checksums)
        elif rank == 0:
            local = dcp_problems(folder)
    except CheckpointError as e:
        local = [(MANIFEST, str(e))]
    found = local
    if world > 1:
        gathered: List[Optional[list]] = [None] * world
        dist.all_gather_object(gathered, local, group=agreement_group())
        found = sorted({tuple(p) for g in gathered for p in (g or [])})
    if found:
        raise CorruptCheckpoint(f"{folder} failed verification: {_describe(found)}")
    if manifest is None and rank == 0 and not quiet:
        print(f"[checkpoint] warning: {folder} has no {MANIFEST} (saved before manifests, or by the conversion "
              f"tools): file sizes checked against its torch_dist metadata only, no checksums", flush=True)
    if manifest is not None and checksums and _update_fn(manifest.get("algorithm", "crc32")) is None and rank == 0:
        print(f"[checkpoint] warning: {folder}'s checksums are {manifest['algorithm']}, which this installation cannot "
              f"compute (pip install crc32c): sizes checked only", flush=True)


def check_checkpoint(folder: str, checksums: bool = True) -> dict:
    """Everything about one iteration folder, offline (tools/check_checkpoint.py)."""
    t0 = time.perf_counter()
    report = {"path": folder, "manifest": False, "algorithm": None, "files": 0, "bytes": 0, "problems": []}
    try:
        manifest = read_manifest(folder)
    except Exception as e:  # noqa: BLE001
        report["problems"] = [{"file": MANIFEST, "problem": str(e)}]
        manifest = None
    else:
        if manifest is not None:
            report.update(manifest=True, algorithm=manifest.get("algorithm"), iteration=manifest.get("iteration"),
                          files=len(manifest["files"]), bytes=sum(e["size"] for e in manifest["files"].values()))
            found = problems(folder, manifest, checksums=checksums)
            unlisted = sorted(set(_all_files(folder)) - set(manifest["files"]))
            report["unlisted"] = unlisted
            if checksums and _update_fn(manifest.get("algorithm", "crc32")) is None:
                report["note"] = f"{manifest['algorithm']} unavailable (pip install crc32c): sizes checked only"
        else:
            found = dcp_problems(folder)
            report["note"] = "no manifest: sizes checked against torch_dist's metadata only"
        report["problems"] = [{"file": rel, "problem": p} for rel, p in found]
    report["ok"] = not report["problems"]
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return report


# ------------------------------------------------------------------------------------------------------
# Retention
# ------------------------------------------------------------------------------------------------------

def apply_retention(root: str, keep: int, protect: int) -> List[str]:
    """Remove all but the newest `keep` committed checkpoints (never `protect`, the one just committed). Each is
    renamed out of the iter_* namespace first, so a crash mid-delete never leaves a half-removed committed copy."""
    removed = []
    its = committed_iterations(root)
    for it in its[:-keep] if keep < len(its) else []:
        if it == protect:
            continue
        name = os.path.join(root, f"iter_{it:07d}")
        doomed = os.path.join(root, f".iter_{it:07d}.deleting")
        os.rename(name, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(name)
    for n in os.listdir(root):  # leftovers of a crash mid-delete
        if n.endswith(".deleting"):
            shutil.rmtree(os.path.join(root, n), ignore_errors=True)
    return removed
