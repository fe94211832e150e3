"""The data feed of a training stream: one data decision per model-parallel replica, each step ready before the
schedule asks for it.

    FeedConfig                                       workers, prefetch depth, how many unreadable files are logged
    StepFeed(packed, step, num_microbatches, config, tag)   the data_iterator Megatron's schedules read
        next(feed) -> PlannedMicroBatch (on the device)      a step's micro-batches, in order
        .state_dict() / .load_state_dict(state)              the resume point after the last step handed out
        .replay(n)                                           skip n packed sequences (a resume without data state)
        .tokens() / .flops() / .data_wait()                  running totals of the steps handed out
        .unreadable                                          {file: count} this rank could not read
        .close()
    fingerprint(packed_list) -> int                  what a step trains on, as a 48-bit number
    compact(packed) -> dict / expand(dict) -> PackedSequence   the reader's broadcast form of a sequence (exact)

One step, made by `_produce` (on the training thread with --num-workers 0, else one step ahead on a producer thread,
started with the iteration; under pipeline parallelism always the producer thread, since the last stage asks for data
only after the first stage's activations reached it):
1. Read once per replica. The replica's reader (its lowest global rank) takes the step's packed sequences from its
   stream (reading, probing and tokenizing the samples) and broadcasts them, with the stream's resume state and its
   sample counts, over a host (gloo) group spanning the replica's TP x CP x PP ranks: one pickled broadcast of about
   6 bytes a token (`compact`; 262K tokens: 1.5 MB to each peer). No other rank of the replica reads, probes or
   tokenizes, so none can skip a sample, pack a sequence or start a resume differently (Megatron's own loaders read
   on one rank and broadcast for the same reason). The reader's probe of each video travels with it: no file is
   probed twice. From webdataset shards (--data-path a folder of .tar files) the reader's media paths name its own
   extraction cache: each rank extracts from the same shards the media it decodes, and every rank deletes a step's
   extracted media once the step is decoded.
2. Plan and decode. Every rank plans each sequence for its place in the mesh; the first pipeline stage decodes only
   the frames stage 1 gives it. The TP ranks of one CP position need the same frames: each decodes 1/TP of them and
   they all-gather the pixels over a host group of their own. Measured (tools/bench_data.py --part tp,
   docs/PERFORMANCE.md "Data feed"): decoding and preprocessing a 720p H.264 frame costs about 100 times what
   broadcasting its 384 x 384 pixels over gloo does, so sharing beats every TP rank decoding everything. Frames
   decoded by NVDEC (dali_gpu) land on each rank's own GPU, whose decoder is its own: those TP ranks decode alike.
3. Agree. One all-reduce (MAX) over the replica's host group of every media item's could-not-read flag and the
   step's fingerprint (+f, -f): every rank of the replica, the last pipeline stage included, blanks and drops the same
   documents; a fingerprint that differs (a rank would train on other sequences than its peers) stops the job naming
   the ranks and the first sample where they differ. The rank that could not read a file logs it with the sample, for
   its first `logged_unreadable` files; past those it counts them (`unreadable`, printed at the end of the run).
4. The step's micro-batches wait on the host (pixels in the encoder's dtype, pinned on CUDA) in a queue of at most
   `prefetch_steps` steps. The training thread takes a step (the time it waits is the step's data_wait_s), sums the
   step totals (LongVILAStep.finish_step, one host all-reduce over DP x CP) and moves each micro-batch to the device
   only when the schedule asks for it: one micro-batch's tensors on the device at a time.

Memory: besides the step being trained, the producer holds up to `prefetch_steps` prepared steps and the one it is
preparing, on the host: per step, its micro-batches' token tensors (a few bytes per token) and this rank's decoded
frames (3 x S x S in the encoder's dtype each: 0.9 MB at 384 px in bf16, 1.7 MB in fp32).

Errors on the producer thread are raised on the training thread when the step that met them is taken, with their
own message; an error of the reader stops its peers too (they learn of it through the broadcast and end quietly,
the reader printing it). With any --num-workers the steps, their order and their resume points are the same: a run
saved with one value resumes with another on the same sample, with bitwise equal losses.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import queue
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Union

import torch
import torch.distributed as dist

from ..batch.microbatch import PlannedMicroBatch
from ..batch.sample import IGNORE_INDEX
from ..data.packing import PackedSequence
from ..data.dataset import frame_keys
from ..data.video import dali_gpu_available
from ..errors import DataDisagreement, DataError, FaultExit, StepError
from ..parallel import comm
from ..parallel.groups import host_group_by
from ..runtime.modules import model_device
from .step import LongVILAStep, StepCounts

__all__ = ["FeedConfig", "StepFeed", "fingerprint"]

logger = logging.getLogger("megatron_longvila.training")


@dataclass(kw_only=True)
class FeedConfig:
    """How a stream's steps are prepared."""

    num_workers: int = 0
    """--num-workers: 0 prepares each step on the training thread when the schedule asks for it (with pipeline
    parallelism a producer thread prepares it ahead all the same); N >= 1 runs a producer thread that prepares the
    next step while the current one trains, N threads decoding its media items."""
    prefetch_steps: int = 1
    """Prepared steps that may wait in the queue (with num_workers >= 1)."""
    logged_unreadable: int = 3
    """Files this rank could not read that are logged one by one (with the sample); past it they are counted."""

    def __post_init__(self):
        if self.num_workers < 0:
            raise ValueError(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.prefetch_steps < 1:
            raise ValueError(f"FeedConfig.prefetch_steps must be >= 1, got {self.prefetch_steps}")


@dataclass
class _Step:
    """One prepared step (host)."""

    n: int
    planned: List[PlannedMicroBatch]
    state: dict
    counts: StepCounts
    tokens: int
    flops: float


class _Failed:
    """An error met while preparing a step, carried to the training thread."""

    def __init__(self, error: BaseException):
        self.error = error


def fingerprint(packed_list) -> int:
    """What a step trains on (its sequences' sample ids and lengths, and each media file with its frames), as a 48-bit
    number: exact in a float64, so it can ride along in a MAX all-reduce."""
    h = hashlib.blake2b(digest_size=6)
    for p in packed_list:
        h.update(repr((list(p.sample_ids), list(p.seq_lens),
                       [(m.path, list(m.frame_indices)) for m in p.media])).encode())
    return int.from_bytes(h.digest(), "little")


def compact(p) -> dict:
    """A packed sequence in as few bytes as it allows, for the reader's broadcast: token ids as int32, labels as a
    learned-mask where they are the ids (they are, for tokenized conversations), positions omitted where they restart
    at 0 per document, loss weights as one value per document and a mask where each document has one. Each short
    form is used only where it gives back exactly the tensor it replaces (`expand`): 6 bytes a token instead of 28."""
    ids = p.input_ids
    out = {"seq_lens": list(p.seq_lens), "media": p.media, "sample_ids": list(p.sample_ids),
           "indices": list(p.indices), "input_ids": ids, "labels": p.labels, "position_ids": p.position_ids,
           "loss_weights": p.loss_weights}
    if ids.numel() and -2 ** 31 <= int(ids.min()) and int(ids.max()) < 2 ** 31:
        out["input_ids"] = ids.to(torch.int32)
    learned = p.labels != IGNORE_INDEX
    if torch.equal(torch.where(learned, ids, p.labels), p.labels):
        out["labels"] = learned
    if torch.equal(torch.cat([torch.arange(n) for n in p.seq_lens]), p.position_ids):
        out["position_ids"] = None
    w, values, start = p.loss_weights, [], 0
    for n in p.seq_lens:
        uniq = torch.unique(w[start:start + n][w[start:start + n] != 0])
        if uniq.numel() > 1:
            break
        values.append(float(uniq[0]) if uniq.numel() else 0.0)
        start += n
    else:
        out["loss_weights"] = (w != 0, torch.tensor(values, dtype=w.dtype))
    return out


def expand(d: dict) -> PackedSequence:
    """The packed sequence `compact` shortened, exactly."""
    ids = d["input_ids"].to(torch.long)
    labels = d["labels"]
    if labels.dtype == torch.bool:
        labels = torch.where(labels, ids, torch.full_like(ids, IGNORE_INDEX))
    pos = d["position_ids"]
    if pos is None:
        pos = torch.cat([torch.arange(n) for n in d["seq_lens"]])
    weights = d["loss_weights"]
    if isinstance(weights, tuple):
        mask, values = weights
        weights = mask.to(values.dtype) * torch.repeat_interleave(values, torch.tensor(d["seq_lens"]))
    return PackedSequence(input_ids=ids, labels=labels, position_ids=pos, loss_weights=weights,
                          seq_lens=d["seq_lens"], media=d["media"], sample_ids=d["sample_ids"], indices=d["indices"])


class StepFeed:
    """Megatron's data iterator for one stream (see the module docstring).

    Args:
        packed: the replica's PackedIterator (only the reader reads it; every rank holds its resume state).
        step: this rank's LongVILAStep.
        num_microbatches: per step, or a callable (megatron.training's calculator: batch-size ramp-up).
        config: FeedConfig.
        tag: names the stream's host group; every rank builds its streams' feeds in the same order (collective).
    """

    def __init__(self, packed, step: LongVILAStep, num_microbatches: Union[int, Callable[[], int]],
                 config: Optional[FeedConfig] = None, *, tag: str = "train"):
        self.packed = packed
        self.step = step
        self.num_microbatches = num_microbatches
        self.config = config or FeedConfig()
        self.group, self.replica, self.reader = None, (0,), 0
        self.tp_group, self.tp_ranks = None, (0,)
        if dist.is_initialized() and dist.get_world_size() > 1:
            from megatron.core import parallel_state as ps

            self.group, self.replica = host_group_by(ps.get_data_parallel_rank(), tag=f"data:{tag}")
            self.reader = self.replica[0]
            # The TP ranks of one CP position of one stage split the decoding of their (identical) frames.
            self.tp_group, self.tp_ranks = host_group_by(
                (ps.get_data_parallel_rank(), ps.get_context_parallel_rank(), ps.get_pipeline_model_parallel_rank()),
                tag=f"data:{tag}:tp")
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        # A replica spanning pipeline stages exchanges a step's data before its stages pair up in the schedule: the
        # last stage waits for the first one's activations before it asks for data, so a producer thread, started
        # with the iteration, prepares each step ahead whatever --num-workers says.
        self.threaded = self.config.num_workers > 0 or self._pipeline_parallel()
        self.is_reader = self.rank == self.reader
        self._source = None  # the reader's generator over `packed`
        self._state = packed.state_dict()  # the resume point after the last step handed out
        self._ready: List[PlannedMicroBatch] = []
        self._queue: Optional[queue.Queue] = None
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(self.config.num_workers, thread_name_prefix="longvila-decode") \
            if self.config.num_workers > 1 else None
        self._tokens, self._flops, self._wait = 0, 0.0, 0.0
        self.unreadable: Counter = Counter()
        self._media_root: Optional[str] = None  # shards: where the reader extracted this step's media
        self.closed = False

    @staticmethod
    def _pipeline_parallel() -> bool:
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return False
        from megatron.core import parallel_state as ps

        return ps.get_pipeline_model_parallel_world_size() > 1

    # -- the schedule's side ------------------------------------------------------------------------------------
    def __iter__(self):
        if self.threaded and self._thread is None:  # every rank starts preparing before any schedule pairs them
            self._start(self.num_microbatches() if callable(self.num_microbatches) else int(self.num_microbatches))
        return self

    def __next__(self) -> PlannedMicroBatch:
        if not self._ready:
            t0 = time.perf_counter()
            n = self.num_microbatches() if callable(self.num_microbatches) else int(self.num_microbatches)
            item = self._take(n)
            planned = self.step.finish_step(item.planned, counts=item.counts)
            self._state = item.state
            self._tokens += item.tokens
            self._flops += item.flops
            self._ready = list(planned)
            self._wait += time.perf_counter() - t0
        return self.step.to_device(self._ready.pop(0))

    def tokens(self) -> int:
        """Real tokens of the steps handed out (this rank's replica)."""
        return self._tokens

    def flops(self) -> float:
        """Model FLOPs of those steps (first pipeline stage; planning.flops), for TFLOP/s and MFU."""
        return self._flops

    def data_wait(self) -> float:
        """Seconds the training thread waited for its steps' data so far (the step totals' all-reduce included)."""
        return self._wait

    # -- resumption --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Where a resumed run starts: after the last step handed out (not after the steps prepared ahead)."""
        return dict(self._state)

    def load_state_dict(self, state: dict) -> None:
        self._halt()
        self.packed.load_state_dict(state)
        self._state = dict(state)
        self._source = None
        self._ready = []

    def replay(self, sequences: int) -> None:
        """Skip `sequences` packed sequences (a resume from a checkpoint saved without a data state): the reader
        reads them again; its state reaches the others with the next step."""
        self._halt()
        if self.is_reader:
            source = self._reader_source()
            for _ in range(sequences):
                next(source)
            self._state = self.packed.state_dict()

    # -- producing -------------------------------------------------------------------------------------------------
    def _reader_source(self):
        if self._source is None:
            self._source = iter(self.packed)
        return self._source

    def _take(self, n: int) -> _Step:
        if not self.threaded:
            return self._produce(n)
        while True:
            if self._thread is None:
                self._start(n)
            item = self._get()
            if isinstance(item, _Failed):
                self._thread = None
                raise item.error
            if item.n == n:
                return item
            # The step size changed (batch-size ramp-up) after this step was prepared: start again from the last
            # step handed out, with the new size. Every rank of the replica sees the same sizes, so all rewind.
            self._halt()
            self.packed.load_state_dict(self._state)
            self._source = None

    def _get(self):
        while True:
            try:
                return self._queue.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise StepError("the data producer thread ended without a word (see the log above)") from None

    def _start(self, n: int) -> None:
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.config.prefetch_steps)
        device = model_device(self.step.model)
        self._thread = threading.Thread(target=self._run, args=(n, device), name="longvila-data-producer",
                                        daemon=True)
        self._thread.start()

    def _run(self, n: int, device) -> None:
        if device.type == "cuda":
            torch.cuda.set_device(device)  # the current device is per thread
        while True:
            try:
                item = self._produce(n)
            except BaseException as e:  # carried to the training thread, raised there
                item = _Failed(e)
            # The stop flag is read only while the queue is full: every rank's producer then stops after the same
            # number of steps, so the replica's collectives stay paired when the feed rewinds.
            while True:
                try:
                    self._queue.put(item, timeout=0.2)
                    break
                except queue.Full:
                    if self._stop.is_set():
                        return
            if isinstance(item, _Failed):
                return

    def _halt(self) -> None:
        """Stop the producer after the steps it has prepared (they are dropped)."""
        if self._thread is not None and self._thread.is_alive():
            self._stop.set()
            self._thread.join()
        self._thread = None
        self._queue = None
        self._stop.clear()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._thread is not None and self._thread.is_alive():
            self._stop.set()
            # Bounded: every rank's producer finishes the step it is preparing (its peers do the same), then sees the
            # flag; a producer still waiting on a collective after that is left to end with the process.
            self._thread.join(timeout=30)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        source = getattr(getattr(self.packed, "dataset", None), "source", None)
        if not (self._thread is not None and self._thread.is_alive()) and hasattr(source, "close"):
            # shards: this rank's extraction cache
            source.close()

    def _produce(self, n: int) -> _Step:
        payload = None
        if self.is_reader:
            try:
                source = self._reader_source()
                seqs = [next(source) for _ in range(n)]
                ds = self.packed.dataset
                payload = {"n": n, "packed": seqs, "state": self.packed.state_dict(),
                           "counts": StepCounts(ok=int(ds.ok), skipped=dict(ds.skipped)),
                           # Shards: where the reader extracted the media (the others extract their own).
                           "media_root": getattr(ds.source, "cache_dir", None)}
            except BaseException as e:
                if self.group is not None:  # the peers stop with it instead of waiting for the broadcast
                    self._broadcast({"error": f"{type(e).__name__}: {e}"})
                raise
        if self.group is not None:
            if self.is_reader:
                self._broadcast({**payload, "packed": [compact(p) for p in payload["packed"]]})
            else:
                payload = self._broadcast(None)
                if "error" not in payload:
                    payload["packed"] = [expand(d) for d in payload["packed"]]
        if "error" in payload:
            raise FaultExit(f"rank {self.reader}, which reads this replica's data, stopped: {payload['error']}")
        seqs = payload["packed"]
        fp = fingerprint(seqs)  # before any rank makes a path its own
        self._media_root = payload.get("media_root")
        step = self.step
        planned = [step.plan(p) for p in seqs]
        mapper = self._pool.map if self._pool is not None else map
        # NVDEC (DALI's GPU decoder) writes the frames on this rank's GPU: asked for, or "auto" where it can run.
        dev, backend = model_device(step.model), step.config.decode_backend
        device = dev if dev.type == "cuda" and (backend == "dali_gpu" or (backend == "auto" and
                                                                           dali_gpu_available())) else None
        decoded = [self._decode(p, pl, mapper, device) for p, pl in zip(seqs, planned)]
        failed = self._agree(fp, seqs, [f for f, _ in decoded])
        source = getattr(self.packed.dataset, "source", None)
        if hasattr(source, "release"):  # shards: this step's media are decoded; the cache holds what is in flight
            source.release([m.path for p in seqs for m in p.media])
        for p, (mine, errors) in zip(seqs, decoded):
            self._tell_unreadable(p, errors)
        tokens, flops = 0, 0.0
        out = []
        for p, pl, f in zip(seqs, planned, failed):
            t, fl = step.sequence_figures(p)
            tokens += t
            flops += fl
            out.append(step.stage(step.drop_failed(p, pl, f)))
        return _Step(n=payload["n"], planned=out, state=payload["state"], counts=payload["counts"], tokens=tokens,
                     flops=flops)

    def _decode(self, packed, planned: PlannedMicroBatch, mapper, device):
        """This rank's frames: decoded here, or (TP > 1, host decoding) 1/TP of them here and the rest from the TP
        peers (one all-gather of pixels over their host group)."""
        step = self.step
        mine = planned.frames_encoded
        if self.tp_group is None or device is not None or not (step.model.pre_process and mine):
            missing = self._localize(packed, mine if step.model.pre_process else [])
            failed, errors = step.decode(packed, planned, mapper=mapper, device=device)
            return failed, {**errors, **missing}
        k, r = len(self.tp_ranks), self.tp_ranks.index(self.rank)
        per = -(-len(mine) // k)
        missing = self._localize(packed, mine[r * per:(r + 1) * per])
        failed, errors = step.decode(packed, planned, mapper=mapper, frames=mine[r * per:(r + 1) * per])
        errors = {**errors, **missing}
        size = step.config.image_size
        buf = torch.zeros(per, 3, size, size)
        for i, g in enumerate(mine[r * per:(r + 1) * per]):
            buf[i] = planned.batch.frames[g].pixels
        parts = [torch.empty_like(buf) for _ in range(k)]
        dist.all_gather(parts, buf, group=self.tp_group)
        for j in range(k):
            for i, g in enumerate(mine[j * per:(j + 1) * per]):
                planned.set_pixels(g, parts[j][i])
        # A frame a peer could not read is blank here too; the replica's agreement tells every rank (its flag).
        return failed, errors

    def _localize(self, packed, frames: List[int]) -> Dict[int, str]:
        """Shards: the media of `frames` extracted by this rank from its own shards (the reader's paths name its own
        cache). Returns {media item: why} for the ones it could not extract (they then fail to decode: blanked)."""
        source = getattr(self.packed.dataset, "source", None)
        if self.is_reader or self._media_root is None or not hasattr(source, "localize") or not frames:
            return {}
        keys = frame_keys(packed)
        errors: Dict[int, str] = {}
        for m in sorted({keys[g][0] for g in frames}):
            item = packed.media[m]
            try:
                item.path = source.localize(item.path, self._media_root)
            except DataError as e:
                errors[m] = str(e)
                item.path = os.path.join(source.cache_dir, os.path.relpath(item.path, self._media_root))
        return errors

    def _broadcast(self, payload):
        """The reader's payload on every rank of the replica: its pickled size, then its bytes."""
        size = torch.zeros(1, dtype=torch.int64)
        if self.is_reader:
            data = torch.frombuffer(bytearray(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)),
                                    dtype=torch.uint8)
            size[0] = data.numel()
        comm.broadcast(size, self.reader, self.group, kind="data_feed")
        if not self.is_reader:
            data = torch.empty(int(size[0]), dtype=torch.uint8)
        comm.broadcast(data, self.reader, self.group, kind="data_feed")
        # Our own job's bytes, from a rank of this job, over its own process group.
        return payload if self.is_reader else pickle.loads(data.numpy().tobytes())

    def _agree(self, fp: int, seqs, failed: List[torch.Tensor]) -> List[torch.Tensor]:
        """Decode failures agreed over the replica (MAX), and the step's fingerprint `fp` compared in the same
        all-reduce."""
        fp = float(fp)
        flags = torch.cat([f.double() for f in failed] + [torch.tensor([fp, -fp], dtype=torch.float64)])
        if self.group is not None:
            comm.all_reduce(flags, self.group, op=dist.ReduceOp.MAX, kind="data_agreement")
        if flags[-2].item() != -flags[-1].item():
            self._disagreement(seqs)
        out, start = [], 0
        for f in failed:
            out.append(flags[start:start + f.numel()].float())
            start += f.numel()
        return out

    def _disagreement(self, seqs) -> None:
        """Name the ranks and the first sample where the replica's ranks differ; the reader raises, the others end
        quietly (one message)."""
        mine = [(list(p.sample_ids), list(p.seq_lens)) for p in seqs]
        gathered: List[object] = [None] * len(self.replica)
        dist.all_gather_object(gathered, (self.rank, mine), group=self.group)
        ref_rank, ref = gathered[0]
        where = "?"
        for rank, theirs in gathered[1:]:
            if theirs == ref:
                continue
            for i, (a, b) in enumerate(zip(ref, theirs)):
                if a != b:
                    diff = next((k for k, (x, y) in enumerate(zip(a[0], b[0])) if x != y), min(len(a[0]), len(b[0])))
                    ours = a[0][diff] if diff < len(a[0]) else "nothing"
                    other = b[0][diff] if diff < len(b[0]) else "nothing"
                    where = (f"rank {ref_rank} would train on sample {ours!r} and rank {rank} on {other!r} "
                             f"(micro-batch {i}, document {diff})")
                    break
            else:
                where = f"rank {ref_rank} and rank {rank} hold different numbers of sequences"
            break
        message = (f"the ranks of data-parallel replica {self.replica} disagree about this step's data: {where}. "
                   f"They must train on the same sequences; this is a bug or a corrupted exchange, not bad data")
        if self.is_reader:
            raise DataDisagreement(message)
        raise FaultExit(message)

    def _tell_unreadable(self, packed, errors: Dict[int, str]) -> None:
        """This rank's files that could not be read: logged with the sample (the first few), then counted."""
        if not errors:
            return
        ends = torch.cumsum(torch.tensor(packed.seq_lens), 0)
        for media, why in errors.items():
            item = packed.media[media]
            doc = int(torch.searchsorted(ends, item.frame_offsets[0], right=True))
            self.unreadable[item.path] += 1
            if sum(self.unreadable.values()) <= self.config.logged_unreadable:
                logger.warning("rank %d could not read %s (sample %r): %s; its frames are blanked and its document "
                               "dropped from this step's loss on every rank of the replica", self.rank, item.path,
                               packed.sample_ids[doc] if doc < len(packed.sample_ids) else "?", why)

    def summary(self) -> Optional[str]:
        """One line on the files this rank could not read (None if none)."""
        if not self.unreadable:
            return None
        total = sum(self.unreadable.values())
        top = ", ".join(f"{path} ({k})" for path, k in self.unreadable.most_common(3))
        return (f"rank {self.rank} could not read {total} media item(s) in {len(self.unreadable)} file(s), each "
                f"blanked and its document dropped on every rank of its replica: {top}")
