"""Frame selection: which frame indices of a video a sample uses, known before anything is decoded.

Stage 1 of MM-SP assigns frames to context-parallel ranks from these indices, so selection must be a
pure function of the probed video facts (frame count, fps) and the sample's options.
"""

from __future__ import annotations

import math

import numpy as np

from megatron_longvila.errors import DataError


def select_frame_indices(
    num_video_frames: int,
    video_fps: float,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    max_frames: int | None = None,
    start_s: float | None = None,
    end_s: float | None = None,
) -> list[int]:
    """Pick the frame indices a sample will encode.

    Args:
        num_video_frames: frames in the whole video (from `probe_video`).
        video_fps: the video's frame rate.
        num_frames: take this many frames spread uniformly over the window (the first and last frame of
            the window included). If the window holds fewer frames, indices repeat so the count stays
            `num_frames` (the model's token budget per video does not change with the video's length).
            A single frame is the middle one.
        fps: instead of a count, take frames at this rate (at most one per source frame).
        max_frames: cap on the result; a longer selection is thinned uniformly to this many.
        start_s, end_s: optional time window in seconds, [start_s, end_s).
        With neither `num_frames` nor `fps`, every frame of the window is taken (then capped).

    Returns:
        Sorted frame indices, unique unless `num_frames` exceeds the window's frame count.

    Raises:
        DataError("zero_frames"): the video, or the window, has no frames.
        ValueError: inconsistent arguments (a caller bug, not a data problem).
    """
    if num_frames is not None and fps is not None:
        raise ValueError("select_frame_indices: give num_frames or fps, not both")
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"select_frame_indices: num_frames must be >= 1, got {num_frames}")
    if fps is not None and not fps > 0:
        raise ValueError(f"select_frame_indices: fps must be > 0, got {fps}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"select_frame_indices: max_frames must be >= 1, got {max_frames}")
    if not video_fps > 0:
        raise ValueError(f"select_frame_indices: video_fps must be > 0, got {video_fps}")
    if num_video_frames <= 0:
        raise DataError("zero_frames", "the video has no frames")

    # Frame i covers [i / video_fps, (i + 1) / video_fps); the window keeps frames that start inside it.
    first = 0 if start_s is None else max(0, math.ceil(start_s * video_fps - 1e-6))
    last = num_video_frames - 1
    if end_s is not None:
        last = min(last, math.ceil(end_s * video_fps - 1e-6) - 1)
    if last < first:
        raise DataError(
            "zero_frames",
            f"time span [{start_s}, {end_s}) s holds no frame of a {num_video_frames}-frame video at {video_fps} fps",
        )
    span = last - first + 1

    if num_frames is not None:
        indices = _uniform(first, last, num_frames)
    elif fps is not None:
        step = max(video_fps / fps, 1.0)
        count = int(math.floor((span - 1) / step + 1e-9)) + 1
        indices = [first + int(round(k * step)) for k in range(count)]
        indices = [i for i in indices if i <= last]
    else:
        indices = list(range(first, last + 1))

    if max_frames is not None and len(indices) > max_frames:
        picks = _uniform(0, len(indices) - 1, max_frames)
        indices = [indices[p] for p in picks]
    return indices


def _uniform(first: int, last: int, count: int) -> list[int]:
    """`count` indices from first to last inclusive, evenly spaced and rounded (repeats when count > span)."""
    if count == 1:
        return [(first + last) // 2]
    return [int(i) for i in np.round(np.linspace(first, last, count)).astype(np.int64)]
