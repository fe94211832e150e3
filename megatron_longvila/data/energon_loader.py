"""Reading LongVILA shards through Megatron-Energon's loaders (needs megatron-energon).

A folder written by `energon.write_shards` and indexed by `energon.prepare_energon` is a crude Energon
dataset. `LongVILATaskEncoder` cooks its samples into the `ManifestRecord`s that `energon.ShardSource`
reads from the same shards (media extracted to a cache folder, since the video decoders work on files), or,
given a tokenizer and a `DataConfig`, into the tokenized `Sample`s `VideoTextDataset` prepares:

    from megatron.energon import WorkerConfig, get_loader, get_train_dataset
    wc = WorkerConfig(rank=dp_rank, world_size=dp_size, num_workers=2)
    ds = get_train_dataset(folder, worker_config=wc, batch_size=None, shuffle_buffer_size=100,
                           max_samples_per_sequence=100, task_encoder=LongVILATaskEncoder(tokenizer, config))
    for sample in get_loader(ds): ...

Bad samples (the reasons of `errors.DataError`) are skipped through Energon's `SkipSample` and counted per
reason in `skipped` (per worker process when num_workers > 0).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections import Counter

from megatron.energon import Cooker, DefaultTaskEncoder, Sample, SkipSample, basic_sample_keys, stateless

from megatron_longvila.data.energon import ENERGON_SUBFLAVORS
from megatron_longvila.errors import DataError
from megatron_longvila.data.manifest import ManifestRecord, parse_record

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ShardSample(Sample):
    """One crude shard sample: the record's JSON bytes and its media members' bytes."""

    record_json: bytes
    files: dict
    """Member name (`<key>.<suffix>`, as the record's media fields name them) -> bytes."""


@stateless
def cook_shard_sample(raw: dict) -> ShardSample:
    """Energon cooker: group a crude sample's parts by the member names the record refers to."""
    key = raw["__key__"]
    if "json" not in raw:
        raise SkipSample()  # media without a record: write_shards never makes one
    files = {f"{key}.{suffix}": data for suffix, data in raw.items() if not suffix.startswith("__") and suffix != "json"}
    return ShardSample(**basic_sample_keys(raw), record_json=raw["json"], files=files)


class LongVILATaskEncoder(DefaultTaskEncoder):
    """Cooks LongVILA shard samples into `ManifestRecord`s, or tokenized `Sample`s given a tokenizer.

    Args:
        tokenizer, config: with both, `encode_sample` returns `VideoTextDataset.prepare_record`'s Sample.
        cache_dir: where media are extracted (default: a temporary folder removed on close()).
    """

    cookers = [Cooker(cook_shard_sample, has_subflavors=ENERGON_SUBFLAVORS)]
    # Energon would decode images and videos itself; LongVILA's decoders read only the frames a rank needs.
    decoder = None

    def __init__(self, tokenizer=None, config=None, *, cache_dir: str | None = None):
        super().__init__()
        from megatron_longvila.data.dataset import VideoTextDataset

        self._dataset = None
        if tokenizer is not None:
            self._dataset = VideoTextDataset([], tokenizer, config)  # only its per-record preparation is used
        self._own_cache = cache_dir is None
        self.cache_dir = cache_dir or tempfile.mkdtemp(prefix="longvila_energon_")
        self.skipped: Counter[str] = Counter()

    def record(self, sample: ShardSample) -> ManifestRecord:
        """The sample's record, its media written under cache_dir/<shard name>/. Raises DataError."""
        # One folder per shard, as ShardSource does (keys are unique within a shard only).
        shard = os.path.splitext(os.path.basename(sample.__sources__[0].shard_name))[0]
        folder = os.path.join(self.cache_dir, shard)
        os.makedirs(folder, exist_ok=True)
        try:
            obj = json.loads(sample.record_json.decode("utf-8"))
        except UnicodeDecodeError:
            raise DataError("undecodable_text", f"{shard}:{sample.__key__}.json is not UTF-8") from None
        except json.JSONDecodeError as e:
            raise DataError("malformed_manifest", f"{shard}:{sample.__key__}.json: {e.msg}") from None
        for name, data in sample.files.items():
            target = os.path.join(folder, os.path.basename(name))
            if not os.path.exists(target):
                with open(target + ".part", "wb") as f:
                    f.write(data)
                os.replace(target + ".part", target)  # a concurrent reader never sees half a file
        # Energon's sample index over the prepared shards (name order) is ShardSource's record number.
        return parse_record(obj, folder, sample.__sources__[0].index)

    @stateless
    def encode_sample(self, sample: ShardSample):
        try:
            record = self.record(sample)
            return record if self._dataset is None else self._dataset.prepare_record(record, record.line)
        except DataError as e:
            self.skipped[e.reason] += 1
            if self.skipped[e.reason] == 1:
                logger.warning("skipping Energon sample %s: %s (further %r skips are counted, not logged)",
                               sample.__key__, e, e.reason)
            raise SkipSample() from None

    def close(self) -> None:
        if self._own_cache:
            shutil.rmtree(self.cache_dir, ignore_errors=True)
