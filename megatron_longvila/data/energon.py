"""Webdataset tar shards for large corpora, in the layout Megatron-Energon indexes.

Each sample is a group of tar members sharing a key: `<key>.json` (the manifest record, media fields
naming members of the same shard) and its media, `<key>.mp4` / `<key>.webm` for a video and
`<key>.img<k>.<ext>` for images. `ShardSource` reads them here without Energon. `prepare_energon(folder)`
(needs the optional megatron-energon package) makes the folder an Energon dataset: it runs Energon's own
indexing (`.nv-meta/` split file and sample index) and declares the samples crude, to be cooked by
`energon_loader.LongVILATaskEncoder` into the records `ShardSource` gives.

`ShardSource` is a sample source for `VideoTextDataset` (`len()` and `record(i)`): it indexes member
offsets once, and extracts a sample's media to a cache folder when the sample is read, since the video
decoders (PyAV, DALI) work on files.
"""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
import tarfile
import tempfile
from typing import Sequence

from megatron_longvila.errors import DataError
from megatron_longvila.runtime.file_view import check_readable
from megatron_longvila.data.manifest import ManifestRecord, parse_record


def energon_available() -> bool:
    try:
        import megatron.energon  # noqa: F401
    except ImportError:
        return False
    return True


ENERGON_SUBFLAVORS = {"longvila": "manifest_record"}
"""Subflavors declared in the prepared dataset.yaml: the LongVILA cooker takes only samples carrying them,
so these shards can be mixed with other datasets in an Energon metadataset."""


def prepare_energon(folder: str | os.PathLike, *, split: Sequence[tuple[str, float]] = (("train", 1.0),),
                    workers: int = 1) -> str:
    """Index the shards of `folder` with Energon and declare them a crude dataset; returns `.nv-meta`'s path.

    What `energon prepare FOLDER` writes when asked for a crude sample type, done non-interactively through
    Energon's own API: `split.yaml` (shards per split part, in name order: no shard shuffle, so the order
    Energon reads matches `ShardSource`), the sample index (`index.sqlite`, `index.uuid`, `.info.json`) and
    `dataset.yaml`. Run it again after adding shards.
    """
    try:
        from megatron.energon.flavors.webdataset import BaseWebdatasetFactory
        from megatron.energon.flavors.webdataset.config import MAIN_FOLDER_NAME
    except ImportError:
        raise ImportError("prepare_energon needs megatron-energon: pip install megatron-energon") from None
    import yaml

    folder = os.path.abspath(os.fspath(folder))
    tars = sorted(os.path.relpath(p, folder) for p in glob.glob(os.path.join(folder, "*.tar")))
    if not tars:
        raise FileNotFoundError(f"prepare_energon: no .tar shards in {folder}")
    BaseWebdatasetFactory.prepare_dataset(folder, tars, split_parts_ratio=[tuple(x) for x in split],
                                          shuffle_seed=None, workers=workers)
    meta = os.path.join(folder, MAIN_FOLDER_NAME)
    with open(os.path.join(meta, "dataset.yaml"), "w", encoding="utf-8") as f:
        # Crude samples (raw member bytes): a manifest record is not one of Energon's fixed sample types,
        # and media must reach the decoders as files, not as Energon-decoded tensors.
        yaml.safe_dump({"__module__": "megatron.energon", "__class__": "CrudeWebdataset",
                        "subflavors": dict(ENERGON_SUBFLAVORS)}, f, sort_keys=False)
    return meta


def write_shards(records: Sequence[ManifestRecord], out_dir: str | os.PathLike, *, samples_per_shard: int = 1000,
                 prefix: str = "shard") -> list[str]:
    """Write records and their media files into tar shards; returns the shard paths.

    A record whose media file is missing raises DataError("missing_file"): shards should hold only
    readable samples (check the manifest with tools/check_data.py first).
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    paths: list[str] = []
    tar = None
    for n, rec in enumerate(records):
        if n % samples_per_shard == 0:
            if tar is not None:
                tar.close()
            paths.append(os.path.join(out_dir, f"{prefix}-{len(paths):06d}.tar"))
            tar = tarfile.open(paths[-1], "w")
        key = f"{n:09d}"
        obj = rec.to_json()
        for m in rec.media:
            if not os.path.isfile(m.path):
                raise DataError("missing_file", f"{m.path}: no such file (record {rec.id!r})")
        image_members = []
        for m in rec.media:
            ext = os.path.splitext(m.path)[1].lower() or ".bin"
            if m.kind == "video":
                member = f"{key}{ext}"
                obj["video"] = member
            else:
                member = f"{key}.img{len(image_members)}{ext}"
                image_members.append(member)
            tar.add(m.path, arcname=member)
        if image_members:
            obj["image"] = image_members[0] if len(image_members) == 1 else image_members
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        info = tarfile.TarInfo(f"{key}.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    if tar is not None:
        tar.close()
    return paths


class ShardSource:
    """Samples of webdataset shards: `len()` and `record(i)`, like `Manifest`.

    Args:
        shards: tar paths, or a folder whose *.tar files are read in name order.
        cache_dir: where media are extracted when read (default: a temporary folder removed on close()).
    """

    def __init__(self, shards: str | os.PathLike | Sequence[str], cache_dir: str | None = None):
        if isinstance(shards, (str, os.PathLike)) and os.path.isdir(shards):
            shards = sorted(glob.glob(os.path.join(os.fspath(shards), "*.tar")))
        elif isinstance(shards, (str, os.PathLike)):
            shards = [os.fspath(shards)]
        if not shards:
            raise FileNotFoundError("ShardSource: no .tar shards given")
        self.shards = list(shards)
        self._own_cache = cache_dir is None
        self.cache_dir = cache_dir or tempfile.mkdtemp(prefix="longvila_shards_")
        # One entry per sample: (shard, key, {suffix: member TarInfo}).
        self._samples: list[tuple[int, str, dict[str, tarfile.TarInfo]]] = []
        self._members: dict[tuple[int, str], tarfile.TarInfo] | None = None  # (shard, member name) -> TarInfo
        for s, path in enumerate(self.shards):
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            with tarfile.open(path, "r") as tar:
                for info in tar.getmembers():
                    if not info.isfile():
                        continue
                    base = os.path.basename(info.name)
                    key, _, suffix = base.partition(".")
                    groups.setdefault(key, {})[suffix] = info
            for key in sorted(groups):
                if "json" in groups[key]:
                    self._samples.append((s, key, groups[key]))

    def __len__(self) -> int:
        return len(self._samples)

    def record(self, i: int) -> ManifestRecord:
        try:
            return self._record(i)
        except OSError as e:  # the shard exists but reading it failed (a failing network file system)
            raise DataError("unreadable_file", f"{self.shards[self._samples[i][0]]}: {e.strerror or e}") from None

    def _record(self, i: int) -> ManifestRecord:
        shard, key, members = self._samples[i]
        check_readable(self.shards[shard])
        folder = os.path.join(self.cache_dir, f"{shard:06d}")
        os.makedirs(folder, exist_ok=True)
        with tarfile.open(self.shards[shard], "r") as tar:
            raw = tar.extractfile(members["json"]).read()
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise DataError("undecodable_text", f"{self.shards[shard]}:{key}.json is not UTF-8") from None
            except json.JSONDecodeError as e:
                raise DataError("malformed_manifest", f"{self.shards[shard]}:{key}.json: {e.msg}") from None
            for suffix, info in members.items():
                if suffix == "json":
                    continue
                target = os.path.join(folder, os.path.basename(info.name))
                if not os.path.exists(target):
                    with tar.extractfile(info) as src, open(target + ".part", "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    os.replace(target + ".part", target)  # never leave a half-written file behind
        return parse_record(obj, folder, i)

    def _member(self, shard: int, name: str) -> tarfile.TarInfo:
        if self._members is None:
            self._members = {(s, os.path.basename(info.name)): info
                             for s, _, members in self._samples for info in members.values()}
        info = self._members.get((shard, name))
        if info is None:
            raise DataError("missing_file", f"{self.shards[shard]}: no member {name!r}")
        return info

    def localize(self, path: str, root: str) -> str:
        """A media file another ShardSource extracted under its cache `root` (another rank's: the data feed's reader),
        extracted from the same shard into this source's cache; its path here. Raises DataError (unreadable_file for
        an I/O error) when the shard cannot give it."""
        rel = os.path.relpath(path, root)
        parts = rel.split(os.sep)
        if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) >= len(self.shards):
            raise DataError("missing_file", f"{path}: not a media file extracted from these shards under {root}")
        shard, name = int(parts[0]), parts[1]
        target = os.path.join(self.cache_dir, rel)
        if os.path.exists(target):
            return target
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            check_readable(self.shards[shard])  # this rank's view of the file system (runtime.file_view)
            with tarfile.open(self.shards[shard], "r") as tar, tar.extractfile(self._member(shard, name)) as src, \
                    open(target + ".part", "wb") as dst:
                shutil.copyfileobj(src, dst)
        except OSError as e:
            raise DataError("unreadable_file", f"{self.shards[shard]}:{name}: {e.strerror or e}") from None
        os.replace(target + ".part", target)
        return target

    def release(self, paths: Sequence[str]) -> None:
        """Delete extracted media files of this source's cache that are no longer needed (a step's, once decoded): the
        cache holds the media in flight, not the corpus."""
        root = os.path.abspath(self.cache_dir) + os.sep
        for path in paths:
            if os.path.abspath(path).startswith(root):
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass

    def close(self) -> None:
        if self._own_cache:
            shutil.rmtree(self.cache_dir, ignore_errors=True)
