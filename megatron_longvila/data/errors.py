"""The data pipeline's error type: a short machine-readable reason plus a human message.

A `DataError` marks one bad sample (the dataset counts it under `reason` and moves on); anything else
that escapes the pipeline is a setup or programming error and stops the run.
"""

from __future__ import annotations

# Every reason the pipeline reports. Tools and dashboards key on these strings: keep them stable.
REASONS = {
    "malformed_manifest": "a manifest line is not a JSON object in the expected conversation format",
    "missing_file": "a media file named by the sample does not exist",
    "empty_file": "a media file has zero bytes",
    "corrupt_video": "a video file cannot be opened or decoded",
    "truncated_video": "a video file ends before the frames its container declares",
    "no_video_stream": "a media file has no video stream",
    "zero_frames": "a video has no frames (or none inside the requested time span)",
    "unsupported_codec": "a video's codec is not decodable by the chosen backend",
    "too_long": "a video or token sequence is longer than the configured limit",
    "corrupt_image": "an image file cannot be decoded",
    "no_assistant_turn": "a conversation has no assistant turn to learn from",
    "bad_conversation": "a conversation's turns or placeholders do not match the sample's media",
    "undecodable_text": "text that is not valid UTF-8 or cannot be tokenized",
}


ADVICE = {
    "too_long": "raise --seq-length, or lower --num-frames / --max-frames",
    "missing_file": "check the manifest's paths (relative paths are relative to the manifest's folder)",
    "unsupported_codec": "re-encode the videos (H.264 decodes everywhere) or pick another --video-backend",
    "malformed_manifest": "fix the manifest lines (tools/check_data.py --list names them)",
}
"""What to change for the common skip reasons."""


def advice(reason: str) -> str:
    """What to change for a skip reason (the rest: tools/check_data.py --list names every bad sample)."""
    return ADVICE.get(reason, "tools/check_data.py --list names the bad samples")


class DataError(Exception):
    """One bad sample. `reason` is a key of `REASONS`; `message` says what and where."""

    def __init__(self, reason: str, message: str):
        if reason not in REASONS:
            raise ValueError(f"unknown DataError reason {reason!r}; known: {sorted(REASONS)}")
        super().__init__(f"[{reason}] {message}")
        self.reason = reason
        self.message = message

    def __reduce__(self):  # picklable across DataLoader worker processes
        return (type(self), (self.reason, self.message))


class BackendUnavailableError(RuntimeError):
    """A decoding backend was asked for but cannot run here (not installed, no GPU). Not a data problem:
    it stops the run instead of being counted as a skip."""


class SkipThresholdExceeded(RuntimeError):
    """Too large a fraction of the dataset was skipped; raised early so a broken dataset stops the run."""
