"""Video probing and decoding of selected frames only.

Backends:
  * ``pyav``: PyAV (FFmpeg) on the CPU; every codec FFmpeg decodes (H.264, HEVC, VP8/9, AV1, MPEG-4, MJPEG).
    Seeks to the keyframe before each far-away target and decodes forward from there only.
  * ``dali_cpu``: NVIDIA DALI's CPU video decoder; VP8, VP9 and MJPEG only (DALI's limit).
  * ``dali_gpu``: NVIDIA DALI's mixed decoder on NVDEC; H.264, HEVC, AV1, MPEG-4, VP8/9, MJPEG.
    Frames come back as a CUDA tensor on the requested device.

All backends return the same pixels: YUV to RGB with BT.601 coefficients (the range, limited or full,
taken from the stream) and bilinear, center-aligned chroma upsampling, which is what DALI does. PyAV's
own `rgb24` conversion (swscale) upsamples chroma differently, so the PyAV backend converts the YUV
planes itself. PyAV and DALI CPU agree within 1 grey level (tested on 4:2:0 VP9 and full-range MJPEG).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import struct
import threading
from collections import Counter
from fractions import Fraction
from typing import Sequence

import numpy as np
import torch

from megatron_longvila.runtime.file_view import check_readable
from megatron_longvila.errors import BackendUnavailableError, DataError

BACKENDS = ("auto", "pyav", "dali_cpu", "dali_gpu")

# Codec names as FFmpeg reports them.
SUPPORTED_CODECS = {
    "pyav": frozenset({"h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "mjpeg", "mpeg2video", "mpeg1video"}),
    "dali_cpu": frozenset({"vp8", "vp9", "mjpeg"}),
    "dali_gpu": frozenset({"h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "mjpeg"}),
}


@dataclasses.dataclass(frozen=True, slots=True)
class VideoInfo:
    """What `probe_video` learns without decoding."""

    path: str
    """The probed file."""
    num_frames: int
    """Frames in the video (from the container's index, or by counting packets where it has none)."""
    fps: float
    """Average frame rate."""
    width: int
    """Frame width in pixels."""
    height: int
    """Frame height in pixels."""
    codec: str
    """FFmpeg's codec name, e.g. "h264", "vp9"."""
    duration_s: float
    """num_frames / fps."""


# --------------------------------------------------------------------------------------------------
# Availability
# --------------------------------------------------------------------------------------------------


@functools.cache
def pyav_available() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def dali_available() -> bool:
    """DALI importable (its CPU decoder then works; the GPU one also needs a CUDA device)."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def dali_gpu_available() -> bool:
    return dali_available() and torch.cuda.is_available()


def _require_backend(backend: str) -> None:
    if backend == "pyav" and not pyav_available():
        raise BackendUnavailableError("video backend 'pyav' needs PyAV: pip install av")
    if backend in ("dali_cpu", "dali_gpu") and not dali_available():
        raise BackendUnavailableError(
            f"video backend {backend!r} needs NVIDIA DALI: pip install nvidia-dali-cuda120 (or -cuda130)"
        )
    if backend == "dali_gpu" and not torch.cuda.is_available():
        raise BackendUnavailableError("video backend 'dali_gpu' needs a CUDA GPU with NVDEC; none is visible")


def resolve_backend(backend: str, codec: str, device: torch.device | str | None = None) -> str:
    """The concrete backend for `backend` ("auto" picks DALI GPU for CUDA devices, else PyAV, else DALI CPU).

    Raises DataError("unsupported_codec") when the chosen backend cannot decode `codec`, and
    BackendUnavailableError when it cannot run here.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        dev = torch.device(device) if device is not None else None
        if dev is not None and dev.type == "cuda" and dali_gpu_available() and codec in SUPPORTED_CODECS["dali_gpu"]:
            backend = "dali_gpu"
        elif pyav_available():
            backend = "pyav"
        elif dali_available() and codec in SUPPORTED_CODECS["dali_cpu"]:
            backend = "dali_cpu"
        elif dali_available():
            raise DataError("unsupported_codec", f"codec {codec!r} needs PyAV (pip install av); DALI's CPU decoder lacks it")
        else:
            raise BackendUnavailableError("no video backend installed: pip install av (and optionally nvidia-dali)")
    _require_backend(backend)
    if codec not in SUPPORTED_CODECS[backend]:
        raise DataError(
            "unsupported_codec",
            f"codec {codec!r} is not decodable by backend {backend!r} (supported: {sorted(SUPPORTED_CODECS[backend])})",
        )
    return backend


# --------------------------------------------------------------------------------------------------
# Probing
# --------------------------------------------------------------------------------------------------


def _check_file(path: str) -> int:
    try:
        check_readable(path)  # this rank's view of the file system (runtime.file_view; test injection)
    except FileNotFoundError:
        raise DataError("missing_file", f"{path}: no such file") from None
    except OSError as e:
        raise DataError("unreadable_file", f"{path}: {e.strerror or e}") from None
    if not os.path.exists(path):
        raise DataError("missing_file", f"{path}: no such file")
    if not os.path.isfile(path):
        raise DataError("missing_file", f"{path}: not a regular file")
    size = os.path.getsize(path)
    if size == 0:
        raise DataError("empty_file", f"{path}: zero bytes")
    return size


def _container_truncated(path: str, size: int) -> bool:
    """True when the container's own top-level sizes run past the end of the file.

    A writer killed mid-file leaves exactly this: an MP4 whose 'mdat' box (or whose 'moov' index) is cut,
    or a Matroska/WebM segment shorter than its declared size. FFmpeg then reports only "invalid data",
    or silently decodes fewer frames, so the structure is checked directly.
    """
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) >= 8 and head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
            offset = 0
            while offset < size:
                f.seek(offset)
                hdr = f.read(16)
                if len(hdr) < 8:
                    return True
                box_size = struct.unpack(">I", hdr[:4])[0]
                if box_size == 1:
                    if len(hdr) < 16:
                        return True
                    box_size = struct.unpack(">Q", hdr[8:16])[0]
                elif box_size == 0:  # box runs to the end of the file
                    return False
                if box_size < 8:
                    return False  # not a box structure we understand: let FFmpeg judge
                offset += box_size
            return offset > size
        if head[:4] == b"\x1a\x45\xdf\xa3":  # EBML (Matroska / WebM)
            f.seek(0)
            data = f.read(64)
            pos = 4
            hdr_size, n = _ebml_vint(data, pos)
            if hdr_size is None:
                return True
            pos += n + hdr_size
            if data[pos : pos + 4] != b"\x18\x53\x80\x67":  # Segment
                return False
            seg_size, n = _ebml_vint(data, pos + 4)
            if seg_size is None:
                return False  # unknown-size segment (live streams): nothing declared to check
            return pos + 4 + n + seg_size > size
    return False


def _ebml_vint(data: bytes, pos: int) -> tuple[int | None, int]:
    if pos >= len(data) or data[pos] == 0:
        return None, 1
    first = data[pos]
    length = 8 - first.bit_length() + 1
    value = first & ((1 << (8 - length)) - 1)
    for b in data[pos + 1 : pos + length]:
        value = (value << 8) | b
    if value == (1 << (7 * length)) - 1:  # all ones: unknown size
        return None, length
    return value, length


def _open(path: str, size: int):
    import av

    try:
        container = av.open(path, metadata_errors="ignore")
    except av.error.FileNotFoundError:
        raise DataError("missing_file", f"{path}: no such file") from None
    except (av.error.FFmpegError, OSError, ValueError) as e:
        if _container_truncated(path, size):
            raise DataError("truncated_video", f"{path}: file ends inside its container ({e})") from None
        if isinstance(e, av.error.EOFError):
            # A complete container that ends right after its headers: tracks declared, no frame written.
            raise DataError("zero_frames", f"{path}: the container holds no frames ({e})") from None
        raise DataError("corrupt_video", f"{path}: cannot open ({e})") from None
    if not container.streams.video:
        container.close()
        if _mp4_declares_video_track(path, size):
            # FFmpeg hides an MP4 video track that has no samples; the file is a zero-frame video.
            raise DataError("zero_frames", f"{path}: the video track has no frames")
        raise DataError("no_video_stream", f"{path}: no video stream")
    return container


def _mp4_declares_video_track(path: str, size: int) -> bool:
    """True when an MP4's 'moov' box holds a track whose handler is 'vide'."""
    with open(path, "rb") as f:
        offset = 0
        while offset + 8 <= size:
            f.seek(offset)
            hdr = f.read(16)
            box_size, kind = struct.unpack(">I", hdr[:4])[0], hdr[4:8]
            if box_size == 1 and len(hdr) >= 16:
                box_size = struct.unpack(">Q", hdr[8:16])[0]
            elif box_size == 0:
                box_size = size - offset
            if box_size < 8:
                return False
            if kind == b"moov":
                f.seek(offset)
                moov = f.read(min(box_size, 64 << 20))
                # hdlr box: size, 'hdlr', version/flags (4), pre_defined (4), handler type.
                at = moov.find(b"hdlr")
                while at >= 0:
                    if moov[at + 12 : at + 16] == b"vide":
                        return True
                    at = moov.find(b"hdlr", at + 4)
                return False
            offset += box_size
    return False


def probe_video(
    path: str | os.PathLike,
    *,
    max_frames: int | None = None,
    max_duration_s: float | None = None,
    allowed_codecs: Sequence[str] | None = None,
) -> VideoInfo:
    """Read a video's frame count, rate, size and codec without decoding pictures.

    Args:
        path: the video file.
        max_frames, max_duration_s: longer videos raise DataError("too_long").
        allowed_codecs: codecs accepted (default: those the PyAV backend decodes).

    Raises:
        DataError with reason missing_file, empty_file, corrupt_video, truncated_video, no_video_stream,
        zero_frames, unsupported_codec or too_long.
    """
    path = os.fspath(path)
    size = _check_file(path)
    if not pyav_available():
        raise BackendUnavailableError("probe_video needs PyAV: pip install av")
    import av

    container = _open(path, size)
    try:
        stream = container.streams.video[0]
        codec = stream.codec_context.name if stream.codec_context is not None else None
        allowed = frozenset(allowed_codecs) if allowed_codecs is not None else SUPPORTED_CODECS["pyav"]
        if codec is None or codec not in allowed:
            raise DataError("unsupported_codec", f"{path}: codec {codec!r} not in {sorted(allowed)}")
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if not rate or float(rate) <= 0:
            raise DataError("corrupt_video", f"{path}: no frame rate in the container")
        fps = float(rate)
        declared = _declared_frames(container, stream, fps)
        num_frames = stream.frames
        if num_frames <= 0:
            # Matroska/WebM keep no frame count: count packets (demuxing reads bytes but decodes nothing).
            try:
                num_frames = sum(1 for p in container.demux(stream) if p.size > 0)
            except av.error.FFmpegError as e:
                raise DataError("corrupt_video", f"{path}: demuxing failed ({e})") from None
            if declared is not None and num_frames < declared - max(2, 0.02 * declared):
                raise DataError(
                    "truncated_video", f"{path}: {num_frames} frames present, container declares about {declared}"
                )
        if _container_truncated(path, size):
            raise DataError("truncated_video", f"{path}: file ends inside its container")
        if num_frames <= 0:
            raise DataError("zero_frames", f"{path}: no frames")
        width, height = stream.codec_context.width, stream.codec_context.height
        if width <= 0 or height <= 0:
            raise DataError("corrupt_video", f"{path}: frame size {width}x{height}")
    finally:
        container.close()
    info = VideoInfo(path, int(num_frames), fps, int(width), int(height), codec, num_frames / fps)
    if max_frames is not None and info.num_frames > max_frames:
        raise DataError("too_long", f"{path}: {info.num_frames} frames > max {max_frames}")
    if max_duration_s is not None and info.duration_s > max_duration_s:
        raise DataError("too_long", f"{path}: {info.duration_s:.1f} s > max {max_duration_s} s")
    return info


def _declared_frames(container, stream, fps: float) -> int | None:
    if stream.duration and stream.time_base:
        return int(round(float(stream.duration * stream.time_base) * fps))
    if container.duration:
        return int(round(container.duration / 1_000_000 * fps))
    return None


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------

DECODE_STATS: Counter[str] = Counter()
"""Process-wide counters of the PyAV backend: "decoded" (pictures decoded), "returned" (pictures asked
for), "seeks". Decoded / returned measures the work spent on frames nobody asked for."""


def decode_frames(
    path: str | os.PathLike,
    indices: Sequence[int],
    *,
    backend: str = "auto",
    device: torch.device | str | None = None,
    info: VideoInfo | None = None,
) -> torch.Tensor:
    """Decode only the frames at `indices` (any order, repeats allowed).

    Args:
        path: the video file.
        indices: frame indices, 0-based, as chosen by `select_frame_indices`.
        backend: "auto", "pyav", "dali_cpu" or "dali_gpu".
        device: where the result goes; "auto" with a CUDA device uses DALI's GPU decoder when installed.
        info: `probe_video`'s result if already known (saves a probe).

    Returns:
        uint8 tensor [len(indices), H, W, 3], RGB, in the order of `indices`.

    Raises:
        DataError for bad files (see `probe_video`; an index past the decodable end is truncated_video),
        BackendUnavailableError when the backend cannot run here.
    """
    path = os.fspath(path)
    indices = [int(i) for i in indices]
    if info is None:
        info = probe_video(path)
    if any(i < 0 or i >= info.num_frames for i in indices):
        raise ValueError(f"{path}: frame indices must lie in [0, {info.num_frames}), got {indices}")
    chosen = resolve_backend(backend, info.codec, device)
    if not indices:
        return torch.empty((0, info.height, info.width, 3), dtype=torch.uint8)
    unique = sorted(set(indices))
    if chosen == "pyav":
        frames = _decode_pyav(path, unique, info)
    else:
        frames = _decode_dali(path, unique, info, gpu=chosen == "dali_gpu", device=device)
    if unique != indices:
        where = {idx: k for k, idx in enumerate(unique)}
        frames = frames[torch.tensor([where[i] for i in indices], device=frames.device)]
    if device is not None and chosen != "dali_gpu":
        frames = frames.to(device)
    return frames


def _decode_pyav(path: str, wanted: list[int], info: VideoInfo) -> torch.Tensor:
    import av

    size = _check_file(path)
    container = _open(path, size)
    out: list[torch.Tensor] = []
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        time_base = stream.time_base or Fraction(1, 1)
        start = stream.start_time or 0
        fps = info.fps

        def index_of(frame) -> int:
            if frame.pts is None:
                raise DataError("corrupt_video", f"{path}: frame without a timestamp")
            return int(round(float((frame.pts - start) * time_base) * fps))

        def seek(target: int):
            """Frames from the keyframe at or before `target`."""
            ts = start + int(round(target / fps / time_base)) if target > 0 else start
            for attempt in (ts, start):
                container.seek(attempt, stream=stream, backward=True, any_frame=False)
                DECODE_STATS["seeks"] += 1
                frames = container.decode(stream)
                try:
                    first = next(frames)
                except StopIteration:
                    return iter(())
                except av.error.FFmpegError as e:
                    raise DataError("corrupt_video", f"{path}: decoding failed near frame {target} ({e})") from None
                # An imprecise index can land past the target: then decode from the beginning.
                if index_of(first) <= target or attempt == start:
                    return itertools.chain([first], frames)
            raise AssertionError("unreachable")

        # Between two targets: if the next keyframe comes at or before the target, seeking skips
        # every frame up to it; otherwise decoding forward is what a seek would do anyway. The
        # keyframe interval is learned from the keyframes seen; until two are seen, seek only for
        # targets more than 32 frames ahead.
        gop = None
        last_key = None
        frames_iter = None
        pos = None  # index of the last decoded frame
        held: tuple[int, torch.Tensor] | None = None
        for target in wanted:
            if held is not None and held[0] >= target:
                out.append(held[1])
                continue
            if frames_iter is None or pos is None:
                must_seek = True
            elif gop is not None and last_key is not None:
                must_seek = target >= last_key + gop and target - pos > 2
            else:
                must_seek = target - pos > 32
            if must_seek:
                frames_iter = seek(target)
                pos = None
            found = None
            try:
                for frame in frames_iter:
                    DECODE_STATS["decoded"] += 1
                    k = index_of(frame)
                    pos = k
                    if frame.key_frame:
                        if last_key is not None and k > last_key:
                            gop = k - last_key
                        last_key = k
                    if k >= target:
                        found = (k, _frame_to_rgb(frame))
                        break
            except av.error.FFmpegError as e:
                raise DataError("corrupt_video", f"{path}: decoding failed near frame {target} ({e})") from None
            if found is None:
                raise DataError("truncated_video", f"{path}: stream ends before frame {target}")
            held = found
            DECODE_STATS["returned"] += 1
            out.append(found[1])
    finally:
        container.close()
    return torch.stack(out)


_BT601 = (0.299, 0.114)  # (Kr, Kb)
_CHROMA_SHIFT = {  # pixel format -> (log2 horizontal, log2 vertical) chroma subsampling, full range?
    "yuv420p": (1, 1, False),
    "yuvj420p": (1, 1, True),
    "yuv422p": (1, 0, False),
    "yuvj422p": (1, 0, True),
    "yuv444p": (0, 0, False),
    "yuvj444p": (0, 0, True),
}


def _frame_to_rgb(frame) -> torch.Tensor:
    """One decoded frame -> uint8 [H, W, 3] RGB, converted the way DALI converts (see module docstring)."""
    fmt = frame.format.name
    if fmt not in _CHROMA_SHIFT:
        # Other formats (10-bit, NV12 from hardware decoders, RGB codecs): let FFmpeg convert.
        return torch.from_numpy(frame.to_ndarray(format="rgb24"))
    sx, sy, full = _CHROMA_SHIFT[fmt]
    full = full or getattr(frame, "color_range", 0) == 2
    h, w = frame.height, frame.width
    ch, cw = -(-h // (1 << sy)), -(-w // (1 << sx))

    def plane(i: int, ph: int, pw: int) -> torch.Tensor:
        p = frame.planes[i]
        arr = np.frombuffer(p, np.uint8).reshape(-1, p.line_size)[:ph, :pw]
        return torch.from_numpy(arr.astype(np.float32))

    y = plane(0, h, w)
    uv = torch.stack([plane(1, ch, cw), plane(2, ch, cw)])
    if (ch, cw) != (h, w):
        uv = torch.nn.functional.interpolate(uv[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    u, v = uv[0] - 128.0, uv[1] - 128.0
    if not full:
        y = (y - 16.0) * (255.0 / 219.0)
        u = u * (255.0 / 224.0)
        v = v * (255.0 / 224.0)
    kr, kb = _BT601
    kg = 1.0 - kr - kb
    r = y + 2.0 * (1.0 - kr) * v
    b = y + 2.0 * (1.0 - kb) * u
    g = (y - kr * r - kb * b) / kg
    return torch.stack([r, g, b], dim=-1).round_().clamp_(0, 255).to(torch.uint8)


# DALI pipelines are costly to build (tens of ms): one per (device, device_id), reused, fed the encoded
# file and the frame list as inputs. A pipeline runs one request at a time.
_dali_pipes: dict[tuple[str, int | None], object] = {}
_dali_lock = threading.Lock()


def _dali_pipeline(gpu: bool, device_id: int | None):
    key = ("mixed" if gpu else "cpu", device_id)
    pipe = _dali_pipes.get(key)
    if pipe is not None:
        return pipe
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=max(1, min(4, os.cpu_count() or 1)), device_id=device_id, prefetch_queue_depth=1)
    def video_pipe():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1, no_copy=False)
        frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
        return fn.decoders.video(encoded, device=key[0], frames=frames)

    pipe = video_pipe()
    pipe.build()
    _dali_pipes[key] = pipe
    return pipe


def _decode_dali(path: str, wanted: list[int], info: VideoInfo, *, gpu: bool, device) -> torch.Tensor:
    device_id = None
    if gpu:
        dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
        if dev.type != "cuda":
            raise ValueError(f"backend 'dali_gpu' decodes onto a CUDA device, got device={device}")
        device_id = dev.index if dev.index is not None else torch.cuda.current_device()
    _check_file(path)
    encoded = np.fromfile(path, dtype=np.uint8)
    with _dali_lock:
        pipe = _dali_pipeline(gpu, device_id)
        pipe.feed_input("encoded", [encoded])
        pipe.feed_input("frames", [np.asarray(wanted, dtype=np.int32)])
        try:
            (out,) = pipe.run()
        except RuntimeError as e:
            # DALI reports every decoder failure as a RuntimeError; a failed pipeline cannot be reused.
            _dali_pipes.pop(("mixed" if gpu else "cpu", device_id), None)
            text = str(e)
            reason = "unsupported_codec" if "not supported" in text else "corrupt_video"
            raise DataError(reason, f"{path}: DALI {'GPU' if gpu else 'CPU'} decoder failed: {text.splitlines()[-1][:200]}") from None
    if gpu:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        tensor = out[0]
        result = torch.empty(tuple(tensor.shape()), dtype=torch.uint8, device=torch.device("cuda", device_id))
        feed_ndarray(tensor, result, cuda_stream=torch.cuda.current_stream(result.device))
        return result
    return torch.from_numpy(np.array(out[0]))
