"""Streaming tensor storage for the converter: safetensors and torch_dist read and written one tensor at a time.

    SafetensorsFile(path)            header parsed and checked (exact, contiguous offsets; no negative dimension);
                                     read(name) reads one tensor, read_rows(name, start, stop, cols) a row range of
                                     it (a column range read row by row), with plain file reads (no mmap: nothing of
                                     the file stays resident once a tensor is consumed); bytes_read counts every
                                     byte read, header included
    SafetensorsWriter(path, entries, metadata, header_text=None)
                                     writes the header first, then each tensor at its offset, in any order; with
                                     `header_text` (the source file's own header) the file comes out byte-identical
    safetensors_header(entries, metadata) -> str    the header the `safetensors` library writes for these tensors
    DcpReader(path)                  torch_dist (torch.distributed.checkpoint) metadata; read(key) loads one tensor
    write_dcp(path, specs, produce, objects)        torch_dist written lazily: each tensor is produced when the
                                     writer reaches it and freed once written (peak: the largest tensor)
    AtomicTarget(target, overwrite)  a temporary sibling folder renamed onto the target at the end; abort() leaves
                                     the file system as it was (the sibling and any parent folder it made removed)
    plain_file_name(entry, where)    an index entry that is a bare file name, else an error naming it as written
    inside(path, root) / check_inside(path, root, what)   a path (symlinks resolved) that stays under a folder
    safe_join(root, rel, what)       root/rel for a relative path without `..`, else an error
    overlap_error(source, target)    the error for a target that is, contains or lies inside a source (or None)
    Progress                         a progress line on stderr (bytes, rate, the tensor at hand)

Trust: safetensors files hold no code, so weights from outside come in through them. torch_dist's `.metadata` is a
pickle, so torch_dist checkpoints are trusted input (this project's own, or NeMo's); pickled `.bin` weights are
refused by the readers.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
import sys
import time
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from ..errors import ConversionError
from ..runtime.versions import applying

__all__ = ["SafetensorsFile", "SafetensorsWriter", "safetensors_header", "DcpReader", "write_dcp", "AtomicTarget",
           "Progress", "DTYPES", "dtype_name", "parse_dtype", "tensor_nbytes", "check_offsets", "plain_file_name",
           "inside", "check_inside", "safe_join", "overlap_error"]

DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
"""safetensors dtype names -> torch dtypes."""
_NAMES = {v: k for k, v in DTYPES.items()}
# The safetensors library orders tensors by dtype (its enum, descending), then by name.
_ORDER = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64",
          "U64"]
_MAX_HEADER = 100 * 1024 * 1024


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _NAMES:
        raise ConversionError(f"dtype {dtype} has no safetensors name")
    return _NAMES[dtype]


def parse_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    """"bf16" / "bfloat16" / "fp16" / "float16" / "fp32" / "float32" / None -> torch dtype or None."""
    if name is None:
        return None
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}
    key = str(name).replace("torch.", "").lower()
    if key not in table:
        raise ConversionError(f"--dtype {name}: choose bf16, fp16 or fp32")
    return table[key]


def _bytes_view(t: torch.Tensor) -> memoryview:
    """A writable memoryview of a contiguous CPU tensor's bytes. Not through .numpy(): that pins the storage
    (it could no longer be freed early, see write_dcp)."""
    import ctypes

    n = t.numel() * t.element_size()
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


def tensor_nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


# ----------------------------------------------------------------------------------------------------
# Paths a folder names (index entries, asset names, symlinks) and where a conversion may write
# ----------------------------------------------------------------------------------------------------

def plain_file_name(entry, where: str) -> str:
    """`entry` when it is a bare file name (no folder part, not `.`/`..`, not absolute), else a ConversionError
    naming `where` (the index file) and the entry as written."""
    ok = (isinstance(entry, str) and entry not in ("", ".", "..") and "/" not in entry and "\\" not in entry
          and "\0" not in entry and not os.path.isabs(entry))
    if not ok:
        raise ConversionError(f"{where} names {entry!r}: every file an index names must be a plain file name inside "
                              f"its own folder (no folder part, no '..', not absolute); nothing was converted")
    return entry


def inside(path: str, root: str) -> bool:
    """Whether `path`, symlinks resolved, is `root` or lies under it (symlinks of `root` resolved too)."""
    p, r = os.path.realpath(path), os.path.realpath(root)
    return p == r or p.startswith(r.rstrip(os.sep) + os.sep)


def check_inside(path: str, root: str, what: str) -> None:
    """Refuse `path` when a symlink takes it out of `root` (a crafted folder could make the converter read, and a
    later export publish, any file of the machine)."""
    if not inside(path, root):
        raise ConversionError(f"{path}: {what} is a symlink to {os.path.realpath(path)}, outside {root}: the "
                              f"converter reads only files inside the source folder (copy the file in instead of "
                              f"linking it); nothing was converted")


def safe_join(root: str, rel: str, what: str) -> str:
    """root/rel for a relative path whose every part is a plain name (no `..`, not absolute), else an error."""
    parts = str(rel).replace("\\", "/").split("/")
    if not rel or os.path.isabs(rel) or any(p in ("", ".", "..") or "\0" in p for p in parts):
        raise ConversionError(f"{what} {rel!r}: not a relative path inside the target folder; nothing is written "
                              f"outside --target")
    return os.path.join(root, *parts)


def overlap_error(source: str, target: str) -> Optional[ConversionError]:
    """The error for a target that is the source folder, contains it or lies inside it (None when apart): replacing
    it would delete the source, writing into it would change the source."""
    s, t = os.path.realpath(source), os.path.realpath(target)
    if s == t:
        how = "is the source folder"
    elif s.startswith(t.rstrip(os.sep) + os.sep):
        how = f"contains the source {source}"
    elif t.startswith(s.rstrip(os.sep) + os.sep):
        how = f"lies inside the source {source}"
    else:
        return None
    return ConversionError(f"--target {target} {how}: write the conversion to a folder apart from the source "
                           f"(--overwrite never replaces or writes into a source)")


def check_offsets(path: str, entries: Dict[str, Tuple[torch.dtype, Tuple[int, ...], int, int]],
                  data_bytes: Optional[int]) -> None:
    """A safetensors header's tensors: non-negative dimensions, each exactly its size, laid end to end from 0
    without overlap or gap (and, for a file read, ending where the file ends: `data_bytes`)."""
    pos = 0
    for name, (dtype, shape, begin, end) in sorted(entries.items(), key=lambda e: (e[1][2], e[1][3], e[0])):
        if any(int(d) < 0 for d in shape):
            raise ConversionError(f"{path}: tensor {name!r} has a negative dimension {list(shape)}")
        if end - begin != tensor_nbytes(shape, dtype):
            raise ConversionError(f"{path}: tensor {name!r} ({dtype_name(dtype)} {list(shape)}) has offsets "
                                  f"{begin}..{end}, not its size {tensor_nbytes(shape, dtype)} (corrupt header)")
        if begin != pos:
            how = "overlaps the tensor before it" if begin < pos else f"leaves a gap of {begin - pos} bytes"
            raise ConversionError(f"{path}: tensor {name!r} at offsets {begin}..{end} {how} (a safetensors file "
                                  f"lays its tensors end to end; corrupt or crafted header)")
        pos = end
    if data_bytes is not None and pos != data_bytes:
        raise ConversionError(f"{path}: the header's tensors end at byte {pos} of a {data_bytes}-byte data section "
                              f"(truncated, padded or crafted file)")


# ----------------------------------------------------------------------------------------------------
# safetensors
# ----------------------------------------------------------------------------------------------------

class SafetensorsFile:
    """One safetensors file: its header (checked against the file), tensors read one at a time."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        self.bytes_read = 0
        """Bytes read from the file so far: the header, then every tensor or row range read."""
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ConversionError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            n = struct.unpack("<Q", head)[0]
            if n > min(size - 8, _MAX_HEADER):
                raise ConversionError(f"{path}: not a safetensors file (header length {n} for a {size}-byte file)")
            raw = f.read(n)
        self.bytes_read += 8 + len(raw)
        try:
            self.header_text = raw.decode("utf-8")
            header = json.loads(self.header_text)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConversionError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
        if not isinstance(header, dict):
            raise ConversionError(f"{path}: not a safetensors file (header is not a JSON object)")
        self.metadata = header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries: Dict[str, Tuple[torch.dtype, Tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            try:
                dtype = DTYPES[e["dtype"]]
                shape = tuple(int(s) for s in e["shape"])
                begin, end = (int(x) for x in e["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ConversionError(f"{path}: tensor {name!r} has a malformed header entry {e}") from None
            self.entries[name] = (dtype, shape, begin, end)
        check_offsets(path, self.entries, size - self.data_start)
        self._fh = None

    def names(self) -> List[str]:
        return list(self.entries)

    def _read_into(self, name: str, offset: int, view: memoryview) -> None:
        if self._fh is None:
            self._fh = open(self.path, "rb")
        self._fh.seek(self.data_start + offset)
        got = self._fh.readinto(view) if len(view) else 0
        self.bytes_read += got
        if got != len(view):
            raise ConversionError(f"{self.path}: short read of {name!r} (file truncated)")

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self.entries[name]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        self._read_into(name, begin, _bytes_view(buf))
        return buf.view(dtype).reshape(shape)

    def read_rows(self, name: str, start: int, stop: int, cols: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Rows start:stop of tensor `name` (elements of a 1-D tensor), and of each row only the columns
        cols[0]:cols[1] (dimension 1) when given: one read for whole rows, one per row for a column range. Only
        those bytes are read."""
        dtype, shape, begin, _ = self.entries[name]
        if not shape:
            raise ConversionError(f"{self.path}: {name!r} is a scalar: it has no rows")
        if not 0 <= start <= stop <= shape[0]:
            raise ConversionError(f"{self.path}: rows {start}:{stop} of {name!r} {list(shape)}")
        row_shape = list(shape[1:])
        row_bytes = tensor_nbytes(row_shape, dtype)
        if cols is None:
            out = torch.empty((stop - start) * row_bytes, dtype=torch.uint8)
            self._read_into(name, begin + start * row_bytes, _bytes_view(out))
            return out.view(dtype).reshape(stop - start, *row_shape)
        c0, c1 = cols
        if len(shape) < 2 or not 0 <= c0 <= c1 <= shape[1]:
            raise ConversionError(f"{self.path}: columns {c0}:{c1} of {name!r} {list(shape)}")
        inner = tensor_nbytes(row_shape[1:], dtype)
        width = (c1 - c0) * inner
        out = torch.empty((stop - start) * width, dtype=torch.uint8)
        view = _bytes_view(out)
        for i in range(stop - start):
            self._read_into(name, begin + (start + i) * row_bytes + c0 * inner, view[i * width:(i + 1) * width])
        return out.view(dtype).reshape(stop - start, c1 - c0, *row_shape[1:])

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def safetensors_header(entries: Sequence[Tuple[str, torch.dtype, Tuple[int, ...]]],
                       metadata: Optional[Dict[str, str]] = None) -> str:
    """The header text the `safetensors` library writes for these tensors (order: dtype, then name; compact
    JSON; padded with spaces to a multiple of 8 bytes)."""
    ordered = sorted(entries, key=lambda e: (-_ORDER.index(dtype_name(e[1])), e[0]))
    header: Dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype, shape in ordered:
        n = tensor_nbytes(shape, dtype)
        header[name] = {"dtype": dtype_name(dtype), "shape": [int(s) for s in shape],
                        "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False)
    pad = (-len(text.encode("utf-8"))) % 8
    return text + " " * pad


class SafetensorsWriter:
    """Writes one safetensors file: the header at once, then tensors at their offsets as they come."""

    def __init__(self, path: str, entries: Sequence[Tuple[str, torch.dtype, Tuple[int, ...]]],
                 metadata: Optional[Dict[str, str]] = None, header_text: Optional[str] = None):
        self.path = path
        want = {name: (dtype, tuple(shape)) for name, dtype, shape in entries}
        if header_text is not None and not self._header_fits(header_text, want):
            header_text = None
        if header_text is None:
            header_text = safetensors_header(entries, metadata)
        header = json.loads(header_text)
        header.pop("__metadata__", None)
        raw = header_text.encode("utf-8")
        self.data_start = 8 + len(raw)
        self.offsets = {name: (int(e["data_offsets"][0]), int(e["data_offsets"][1])) for name, e in header.items()}
        # A header reused from a record must lay the tensors out as the library does (else: overlapping tensors, or
        # a huge sparse file from one far offset); checked before the file is created.
        check_offsets(f"{path} (its header)", {n: (*want[n], *self.offsets[n]) for n in header}, None)
        self.expected = want
        total = max((end for _, end in self.offsets.values()), default=0)
        self.nbytes = self.data_start + total
        self.written = set()
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._f.truncate(self.nbytes)

    @staticmethod
    def _header_fits(text: str, want: Dict[str, Tuple[torch.dtype, Tuple[int, ...]]]) -> bool:
        try:
            header = json.loads(text)
        except json.JSONDecodeError:
            return False
        header.pop("__metadata__", None)
        if not isinstance(header, dict) or set(header) != set(want):
            return False
        try:
            return all(DTYPES.get(e["dtype"]) == want[n][0] and tuple(e["shape"]) == want[n][1]
                       and len(e["data_offsets"]) == 2 for n, e in header.items())
        except (KeyError, TypeError):
            return False

    def write(self, name: str, tensor: torch.Tensor) -> int:
        if name not in self.expected:
            raise ConversionError(f"{self.path}: {name!r} is not one of this file's tensors")
        dtype, shape = self.expected[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ConversionError(f"{self.path}: {name!r} is {tensor.dtype} {list(tensor.shape)}, the header says "
                                  f"{dtype} {list(shape)}")
        begin, end = self.offsets[name]
        t = tensor.detach().contiguous().reshape(-1)
        self._f.seek(self.data_start + begin)
        if end > begin:
            self._f.write(_bytes_view(t.view(torch.uint8)))
        self.written.add(name)
        return end - begin

    def close(self) -> None:
        missing = sorted(set(self.expected) - self.written)
        if missing:
            self._f.close()
            raise ConversionError(f"{self.path}: {len(missing)} tensors never written, e.g. {missing[:5]}")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()


# ----------------------------------------------------------------------------------------------------
# torch_dist
# ----------------------------------------------------------------------------------------------------

class DcpReader:
    """A torch_dist checkpoint folder: key -> (shape, dtype) from its metadata; read(key) loads one tensor."""

    def __init__(self, path: str):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

        if not os.path.isfile(os.path.join(path, ".metadata")):
            raise ConversionError(f"{path}: no torch_dist checkpoint here (no .metadata file)")
        self.path = path
        self.metadata = FileSystemReader(path).read_metadata()
        self.tensors: Dict[str, Tuple[Tuple[int, ...], torch.dtype]] = {}
        self.objects: List[str] = []
        for key, md in self.metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                self.tensors[key] = (tuple(md.size), md.properties.dtype)
            elif isinstance(md, BytesStorageMetadata):
                self.objects.append(key)

    def _read_whole(self, key: str) -> Optional[torch.Tensor]:
        return _dcp_read_whole(self, key)

    def read(self, key: str, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        from torch.distributed.checkpoint import FileSystemReader, load
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

        shape, dtype = self.tensors[key]
        if out is None:
            t = self._read_whole(key)
            if t is not None:
                return t
        t = torch.empty(shape, dtype=dtype) if out is None else out
        with _quiet_dcp():
            load({key: t}, storage_reader=FileSystemReader(self.path),
                 planner=DefaultLoadPlanner(allow_partial_load=True), no_dist=True)
        return t


class _Window(io.RawIOBase):
    """A byte range of a file as a file of its own (torch.load reads one stored tensor in place)."""

    def __init__(self, f, start: int, length: int):
        self.f, self.start, self.length, self.pos = f, start, length, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, pos, whence=0):
        self.pos = {0: pos, 1: self.pos + pos, 2: self.length + pos}[whence]
        return self.pos

    def tell(self):
        return self.pos

    def readinto(self, b):
        n = max(0, min(len(b), self.length - self.pos))
        self.f.seek(self.start + self.pos)
        got = self.f.readinto(memoryview(b)[:n])
        self.pos += got
        return got


def _dcp_read_whole(reader: "DcpReader", key: str) -> Optional[torch.Tensor]:
    """A tensor stored whole in one item (what write_dcp writes), read with torch.load straight from its bytes:
    one copy in memory, where torch's reader holds the item's bytes, the loaded tensor and the target (three)."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    md = reader.metadata.state_dict_metadata[key]
    if len(md.chunks) != 1 or any(md.chunks[0].offsets) or tuple(md.chunks[0].sizes) != tuple(md.size):
        return None
    info = (reader.metadata.storage_data or {}).get(MetadataIndex(key, md.chunks[0].offsets))
    if info is None or getattr(info, "transform_descriptors", None):
        return None
    import re
    import zipfile

    applying("torch_save_zip_layout")
    with open(os.path.join(reader.path, info.relative_path), "rb") as f:
        # The item is a torch.save zip: its pickle (read onto the meta device, no data) says the tensor is whole
        # and contiguous; its one storage record is then read straight into a fresh tensor.
        meta = torch.load(io.BufferedReader(_Window(f, info.offset, info.length), 1 << 16), map_location="meta",
                          weights_only=True)
        nbytes = meta.numel() * meta.element_size() if isinstance(meta, torch.Tensor) else -1
        if (nbytes < 0 or tuple(meta.shape) != tuple(md.size) or not meta.is_contiguous()
                or meta.storage_offset() != 0 or meta.untyped_storage().nbytes() != nbytes):
            return None
        window = _Window(f, info.offset, info.length)
        records = [i for i in zipfile.ZipFile(window).infolist() if re.fullmatch(r"[^/]+/data/\d+", i.filename)]
        if len(records) != 1 or records[0].compress_type != zipfile.ZIP_STORED or records[0].file_size != nbytes:
            return None
        window.seek(records[0].header_offset)
        local = bytearray(30)
        window.readinto(local)
        name_len, extra_len = struct.unpack("<HH", bytes(local[26:30]))
        t = torch.empty(meta.shape, dtype=meta.dtype)
        f.seek(info.offset + records[0].header_offset + 30 + name_len + extra_len)
        if nbytes and f.readinto(_bytes_view(t)) != nbytes:
            raise ConversionError(f"{reader.path}: short read of {key} (file truncated)")
    return t


@contextlib.contextmanager
def _quiet_dcp():
    """torch.distributed.checkpoint warns that a no_dist save or load runs in a single process: it is meant to."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        warnings.filterwarnings("ignore", message="Detected an existing checkpoint")
        yield


def _none_bytes() -> io.BytesIO:
    """A ShardedObject holding None as megatron serializes it (a list of the objects sharing the key)."""
    b = io.BytesIO()
    torch.save([None], b)
    b.seek(0)
    return b


def write_dcp(path: str, specs: Sequence[Tuple[str, Tuple[int, ...], torch.dtype]],
              produce: Callable[[str], torch.Tensor], objects: Iterable[str] = (),
              on_written: Optional[Callable[[str, int], None]] = None) -> None:
    """Write a torch_dist checkpoint of the tensors `specs` (key, global shape, dtype), each made by produce(key)
    only when the writer reaches it and freed as soon as it is written, plus `objects` (unique keys of
    Megatron ShardedObjects, each holding None: the local spec's `_extra_state`).

    Tensors are stored whole (one chunk), which any torch_dist reader reshards; megatron-core loads them into
    any TP x PP layout. Also writes megatron's metadata.json.
    """
    from torch.distributed.checkpoint import FileSystemWriter, save
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.planner import WriteItemType

    os.makedirs(path, exist_ok=True)
    shapes = {k: (tuple(s), d) for k, s, d in specs}
    # Placeholders for planning: right size and dtype, no memory.
    state = {k: torch.empty((), dtype=d).expand(s) for k, (s, d) in shapes.items()}
    for key in objects:
        state[key] = _none_bytes()

    class LazyPlanner(DefaultSavePlanner):
        def __init__(self):
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
            self._prev = None

        def transform_object(self, write_item, obj):  # the objects are serialized already (as megatron does)
            return obj

        def resolve_data(self, write_item):
            fqn = write_item.index.fqn
            if write_item.type == WriteItemType.BYTE_IO:
                return self.state_dict[fqn]
            if self._prev is not None:
                # The previous tensor is on disk: free it (the writer keeps a reference until the file closes).
                prev_key, prev = self._prev
                nbytes = prev.untyped_storage().nbytes()
                prev.untyped_storage().resize_(0)
                if on_written is not None:
                    on_written(prev_key, nbytes)
            t = produce(fqn)
            shape, dtype = shapes[fqn]
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ConversionError(f"{fqn}: produced {t.dtype} {list(t.shape)}, expected {dtype} {list(shape)}")
            t = t.detach().contiguous()
            if t.untyped_storage().nbytes() != t.numel() * t.element_size():
                t = t.clone()  # a view into a larger tensor: the writer would save the whole storage
            self._prev = (fqn, t)
            return t

        def finish(self):
            if self._prev is not None:
                key, prev = self._prev
                nbytes = prev.untyped_storage().nbytes()
                prev.untyped_storage().resize_(0)
                if on_written is not None:
                    on_written(key, nbytes)
                self._prev = None

    planner = LazyPlanner()
    # One writer thread and no copy-ahead: tensors are resolved strictly one after the other.
    writer = FileSystemWriter(path, single_file_per_rank=True, sync_files=True, thread_count=1,
                              per_thread_copy_ahead=0, overwrite=True)
    with _quiet_dcp():
        save(state, storage_writer=writer, planner=planner, no_dist=True)
    planner.finish()
    with open(os.path.join(path, "metadata.json"), "w") as f:
        json.dump({"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
                   "common_backend_version": 1}, f)


# ----------------------------------------------------------------------------------------------------
# Target folders and progress
# ----------------------------------------------------------------------------------------------------

class AtomicTarget:
    """Build a folder under a temporary sibling name and rename it onto `target` at commit: a conversion killed at
    any point leaves no folder at `target` (only `.<name>.partial-<pid>`, removed by the next conversion); a
    conversion that fails (abort) leaves the file system as it was: no sibling, no parent folder it created."""

    def __init__(self, target: str, overwrite: bool = False):
        self.target = os.path.abspath(target)
        if os.path.lexists(self.target) and not overwrite:
            raise ConversionError(f"--target {target} exists: pass --overwrite to replace it")
        if os.path.lexists(self.target) and not os.path.isdir(self.target):
            raise ConversionError(f"--target {target} exists and is not a folder: --overwrite replaces folders only")
        parent, name = os.path.split(self.target)
        self.made: List[str] = []  # parent folders this target created, outermost first (abort removes them)
        p = parent
        while not os.path.isdir(p):
            self.made.insert(0, p)
            p = os.path.dirname(p)
        os.makedirs(parent, exist_ok=True)
        for old in os.listdir(parent):  # leftovers of killed conversions to this target
            if old.startswith(f".{name}.partial-") or old.startswith(f".{name}.old-"):
                shutil.rmtree(os.path.join(parent, old), ignore_errors=True)
        self.tmp = os.path.join(parent, f".{name}.partial-{os.getpid()}")
        os.makedirs(self.tmp)

    def path(self, *parts: str) -> str:
        p = os.path.join(self.tmp, *parts)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        return p

    def commit(self) -> str:
        old = None
        if os.path.exists(self.target):
            parent, name = os.path.split(self.target)
            old = os.path.join(parent, f".{name}.old-{os.getpid()}")
            os.rename(self.target, old)
        os.rename(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.target

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        for p in reversed(self.made):
            with contextlib.suppress(OSError):
                os.rmdir(p)  # empty unless something else wrote there meanwhile: then it stays


class Progress:
    """Bytes converted so far, on one line of stderr (rewritten on a terminal, every 10% otherwise)."""

    def __init__(self, total: int, desc: str, enabled: bool = True, stream=None):
        self.total = max(int(total), 1)
        self.desc = desc
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.done = 0
        self.t0 = time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last_decile = -1

    def update(self, nbytes: int, what: str = "") -> None:
        self.done += int(nbytes)
        if not self.enabled:
            return
        frac = min(self.done / self.total, 1.0)
        dt = max(time.perf_counter() - self.t0, 1e-9)
        line = (f"{self.desc}: {100 * frac:5.1f}% {self.done / 2**30:.2f}/{self.total / 2**30:.2f} GiB "
                f"{self.done / 2**20 / dt:7.1f} MiB/s {what[-60:]}")
        if self.tty:
            self.stream.write("\r" + line.ljust(120))
            self.stream.flush()
        elif int(frac * 10) > self._last_decile:
            self._last_decile = int(frac * 10)
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
