"""JSONL manifests in the LLaVA/VILA conversation format.

One sample per line:

    {"id": "v1", "video": "clips/a.mp4",
     "conversations": [{"from": "human", "value": "<video>\\nWhat happens?"},
                       {"from": "gpt", "value": "A dog runs."}],
     "num_frames": 8}

Media keys: "video" (one path), "image" (a path or a list of paths), or neither (text only). Relative
paths are relative to the manifest's folder. Optional keys this project defines (all per sample):

    num_frames   take this many frames, uniformly spread (overrides the dataset default)
    fps          or take frames at this rate
    max_frames   cap on the frames taken
    start_s, end_s   time span of the video to use, in seconds
    loss_weight  weight of the sample's tokens in the loss
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator

import numpy as np

from megatron_longvila.errors import DataError

OPTIONAL_NUMBER_KEYS = ("num_frames", "fps", "max_frames", "start_s", "end_s", "loss_weight")


@dataclasses.dataclass(slots=True)
class MediaRef:
    """A media file named by a manifest line."""

    kind: str
    """"image" or "video"."""
    path: str
    """Resolved path (relative paths joined to the manifest's folder)."""


@dataclasses.dataclass(slots=True)
class ManifestRecord:
    """One parsed manifest line."""

    id: str
    """The line's "id", or "line<N>" when it has none."""
    media: list[MediaRef]
    """Images/videos in the order the placeholders consume them."""
    conversations: list[dict]
    """The turns, each {"from": ..., "value": ...}; checked further by the chat template."""
    num_frames: int | None = None
    """Per-sample frame count (overrides the dataset's)."""
    fps: float | None = None
    """Per-sample sampling rate (overrides the dataset's)."""
    max_frames: int | None = None
    """Per-sample frame cap."""
    start_s: float | None = None
    """Start of the time span to use, seconds."""
    end_s: float | None = None
    """End of the time span to use, seconds (exclusive)."""
    loss_weight: float | None = None
    """Per-sample loss weight (None: the dataset decides)."""
    line: int = -1
    """0-based physical line number in the manifest file."""

    def to_json(self, base_dir: str | None = None) -> dict:
        """The manifest form again (paths made relative to `base_dir` when given)."""
        out: dict[str, Any] = {"id": self.id}
        paths = {k: [os.path.relpath(m.path, base_dir) if base_dir else m.path for m in self.media if m.kind == k]
                 for k in ("video", "image")}
        if paths["video"]:
            out["video"] = paths["video"][0]
        if paths["image"]:
            out["image"] = paths["image"][0] if len(paths["image"]) == 1 else paths["image"]
        out["conversations"] = self.conversations
        for key in OPTIONAL_NUMBER_KEYS:
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


def parse_record(obj: Any, base_dir: str, line: int = -1) -> ManifestRecord:
    """Validate one decoded JSON line. Raises DataError("malformed_manifest") with the field at fault."""
    where = f"line {line + 1}" if line >= 0 else "record"
    if not isinstance(obj, dict):
        raise DataError("malformed_manifest", f"{where}: expected a JSON object, got {type(obj).__name__}")
    media: list[MediaRef] = []
    video = obj.get("video")
    if video is not None:
        if not isinstance(video, str) or not video:
            raise DataError("malformed_manifest", f"{where}: 'video' must be a non-empty path string")
        media.append(MediaRef("video", _resolve(video, base_dir)))
    image = obj.get("image")
    if image is not None:
        images = [image] if isinstance(image, str) else image
        if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
            raise DataError("malformed_manifest", f"{where}: 'image' must be a path or a list of paths")
        media.extend(MediaRef("image", _resolve(p, base_dir)) for p in images)
    conversations = obj.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise DataError("malformed_manifest", f"{where}: 'conversations' must be a non-empty list")
    numbers: dict[str, Any] = {}
    for key in OPTIONAL_NUMBER_KEYS:
        value = obj.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise DataError("malformed_manifest", f"{where}: '{key}' must be a number, got {value!r}")
        if key in ("num_frames", "max_frames"):
            if int(value) != value or value < 1:
                raise DataError("malformed_manifest", f"{where}: '{key}' must be a positive integer, got {value!r}")
            value = int(value)
        elif key == "fps" and value <= 0:
            raise DataError("malformed_manifest", f"{where}: 'fps' must be > 0, got {value!r}")
        elif key in ("start_s", "end_s") and value < 0:
            raise DataError("malformed_manifest", f"{where}: '{key}' must be >= 0, got {value!r}")
        elif key == "loss_weight" and value < 0:
            raise DataError("malformed_manifest", f"{where}: 'loss_weight' must be >= 0, got {value!r}")
        numbers[key] = value
    if "num_frames" in numbers and "fps" in numbers:
        raise DataError("malformed_manifest", f"{where}: give 'num_frames' or 'fps', not both")
    if "start_s" in numbers and "end_s" in numbers and numbers["end_s"] <= numbers["start_s"]:
        raise DataError("malformed_manifest", f"{where}: 'end_s' must be after 'start_s'")
    if numbers.keys() & {"num_frames", "fps", "start_s", "end_s", "max_frames"} and video is None:
        raise DataError("malformed_manifest", f"{where}: frame options given without a 'video'")
    sample_id = obj.get("id", f"line{line + 1}")
    return ManifestRecord(id=str(sample_id), media=media, conversations=conversations, line=line, **numbers)


def parse_line(raw: bytes, base_dir: str, line: int = -1) -> ManifestRecord:
    """Raw bytes of one line -> record. Invalid UTF-8 is 'undecodable_text', bad JSON 'malformed_manifest'."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError("undecodable_text", f"line {line + 1}: not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError("malformed_manifest", f"line {line + 1}: invalid JSON ({e.msg}, column {e.colno})") from None
    return parse_record(obj, base_dir, line)


def _resolve(path: str, base_dir: str) -> str:
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base_dir, path))


class Manifest:
    """Random access to the lines of a JSONL manifest (an index of line offsets, not the lines).

    Blank lines are not samples. `len(manifest)` lines; `manifest.record(i)` parses line i on demand
    (raising DataError for a bad one), so a resumed run can start anywhere.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"manifest not found: {self.path}")
        self.base_dir = os.path.dirname(os.path.abspath(self.path))
        offsets, lengths, lines = [], [], []
        with open(self.path, "rb") as f:
            pos = 0
            for n, raw in enumerate(f):
                if raw.strip():
                    offsets.append(pos)
                    lengths.append(len(raw))
                    lines.append(n)
                pos += len(raw)
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._lengths = np.asarray(lengths, dtype=np.int64)
        self._lines = np.asarray(lines, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._offsets)

    def raw(self, i: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(int(self._offsets[i]))
            return f.read(int(self._lengths[i]))

    def record(self, i: int) -> ManifestRecord:
        return parse_line(self.raw(i).rstrip(b"\r\n"), self.base_dir, int(self._lines[i]))

    def __iter__(self) -> Iterator[ManifestRecord | DataError]:
        """Every line: its record, or the DataError that rejects it."""
        for i in range(len(self)):
            try:
                yield self.record(i)
            except DataError as e:
                yield e


def write_manifest(records, path: str | os.PathLike) -> None:
    """Write records (ManifestRecord or plain dicts) as JSON Lines, paths relative to the file's folder."""
    path = os.fspath(path)
    base_dir = os.path.dirname(os.path.abspath(path))
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            obj = rec.to_json(base_dir) if isinstance(rec, ManifestRecord) else rec
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
