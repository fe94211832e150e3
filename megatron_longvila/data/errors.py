"""The data pipeline's skip reasons, and what to change for each.

A `DataError` (megatron_longvila.errors) marks one bad sample: the dataset counts it under its `reason` and moves
on; anything else that escapes the pipeline is a setup or programming error and stops the run.

    REASONS            reason -> what it means (tools and dashboards key on these strings: keep them stable)
    ADVICE, advice()   what to change for the common reasons
"""

from __future__ import annotations

from megatron_longvila.errors import DATA_REASONS

__all__ = ["REASONS", "ADVICE", "advice"]

REASONS = DATA_REASONS
"""Every reason the pipeline reports (defined beside DataError, which checks it)."""

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
