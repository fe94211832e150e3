"""Real media files for the data tests, made with an ffmpeg binary (Debian's, or imageio-ffmpeg's)."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

import numpy as np


@functools.cache
def ffmpeg_exe() -> str | None:
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception:  # not installed, or the wheel has no binary for this platform
        return shutil.which("ffmpeg")


def gray_level(i: int) -> int:
    """The grey level of frame i in `make_gray_video` (distinct per frame, away from clipping)."""
    return 16 + (5 * i) % 220


CODEC_ARGS = {
    # Lossless settings: a flat grey frame then decodes to its exact level (up to YUV rounding).
    "h264": ["-c:v", "libx264", "-qp", "0", "-preset", "ultrafast", "-bf", "2"],
    "vp9": ["-c:v", "libvpx-vp9", "-lossless", "1", "-deadline", "realtime", "-cpu-used", "8"],
    "mjpeg": ["-c:v", "mjpeg", "-q:v", "2"],
    "png": ["-c:v", "png"],
}
EXT = {"h264": ".mp4", "vp9": ".webm", "mjpeg": ".avi", "png": ".mkv"}


def make_gray_video(path: str, codec: str = "h264", *, num_frames: int = 48, fps: int = 24, size=(64, 48),
                    gop: int = 12, extra: list[str] | None = None) -> str:
    """A video whose frame i is flat grey `gray_level(i)` with a white square at column 2*i (so frames differ
    in structure too). Returns the path."""
    w, h = size
    frames = np.empty((num_frames, h, w, 3), dtype=np.uint8)
    for i in range(num_frames):
        frames[i] = gray_level(i)
        x = (2 * i) % (w - 8)
        frames[i, 2:10, x : x + 8] = 255
    cmd = [ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}",
           "-r", str(fps), "-i", "-", *CODEC_ARGS[codec], "-g", str(gop), "-pix_fmt",
           "yuvj420p" if codec == "mjpeg" else ("rgb24" if codec == "png" else "yuv420p"), *(extra or []), path]
    subprocess.run(cmd, input=frames.tobytes(), check=True)
    return path


def make_testsrc_video(path: str, codec: str = "h264", *, seconds: float = 2, fps: int = 24, size=(64, 48),
                       gop: int = 12, extra: list[str] | None = None) -> str:
    """FFmpeg's moving colour test pattern (sharp colour edges: a hard case for colour conversion)."""
    args = dict(CODEC_ARGS)
    args["h264"] = ["-c:v", "libx264", "-preset", "ultrafast", "-bf", "2"]
    args["vp9"] = ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8"]
    cmd = [ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i",
           f"testsrc2=size={size[0]}x{size[1]}:rate={fps}:duration={seconds}", *args[codec], "-g", str(gop),
           "-pix_fmt", "yuvj420p" if codec == "mjpeg" else "yuv420p", *(extra or []), path]
    subprocess.run(cmd, check=True)
    return path


def make_zero_frame_video(path: str) -> str:
    """A WebM with a video track and no frame."""
    subprocess.run([ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc2=size=64x48:rate=24:duration=1",
                    "-frames:v", "0", "-c:v", "libvpx-vp9", path], check=True)
    return path


def make_audio_only(path: str) -> str:
    subprocess.run([ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i", "sine=duration=1", "-c:a", "aac", path],
                   check=True)
    return path


def truncate(src: str, dst: str, fraction: float = 0.5) -> str:
    with open(src, "rb") as f:
        data = f.read()
    with open(dst, "wb") as f:
        f.write(data[: int(len(data) * fraction)])
    return dst


def make_image(path: str, size=(40, 30), color=(200, 30, 60)) -> str:
    from PIL import Image

    arr = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    arr[:] = color
    arr[: size[1] // 2, : size[0] // 2] = (10, 250, 90)
    Image.fromarray(arr).save(path)
    return path


def write(path: str, data: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path
