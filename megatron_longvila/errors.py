"""Every exception of the package, in one leaf module (it imports nothing of the package), each marked by where it
is raised.

    RaisedAlike      mixin: raised the same on every rank, from facts every rank has alike (flags, configuration,
                     the same manifest and checkpoint files). A script's entry point (runtime.entry.run_main) prints
                     such an error once, from rank 0, without a traceback.
    RaisedLocally    mixin: raised by the one rank that met the problem (its data, its files, its device, a peer it
                     lost). That rank prints it, with its traceback, and run_main posts it so that its peers end
                     the job at once (training.watchdog's monitor) instead of waiting in a collective.
    raised_alike(e) -> bool    the mark of an exception (unmarked exceptions count as local)

The modules that raise an exception import it from here, so `from megatron_longvila.parallel.mesh import MeshError`
and `from megatron_longvila.errors import MeshError` name the same class. Base classes (ValueError, RuntimeError,
KeyError, SystemExit) are those callers catch.
"""

from __future__ import annotations


class RaisedAlike:
    """Mark of an exception raised identically on every rank (configuration and validation errors)."""

    raised_alike = True


class RaisedLocally:
    """Mark of an exception raised by one rank about what only it saw."""

    raised_alike = False


def raised_alike(e: BaseException) -> bool:
    """Whether `e` is marked as raised alike on every rank (unmarked exceptions: no)."""
    return bool(getattr(e, "raised_alike", False))


# ------------------------------------------------------------------------------------------------------
# Configuration and validation: the same flags and files give the same error on every rank
# ------------------------------------------------------------------------------------------------------

class ArgumentError(RaisedAlike, ValueError):
    """Flags that cannot run together; the message names the one to change."""


class MMSPConfigError(RaisedAlike, ValueError):
    """An MM-SP configuration that cannot run; the message names the flag (or argument) to change."""


class MeshError(RaisedAlike, ValueError):
    """An MM-SP mesh that cannot be built from the given sizes and groups."""


class RecordMismatch(RaisedAlike, ValueError):
    """A checkpoint's model record that does not describe the model being built."""


class ConversionError(RaisedAlike, ValueError):
    """A checkpoint folder or conversion request that cannot be served; the message says what to change."""


class InferenceError(RaisedAlike, ValueError):
    """A model, layout or prompt that MM-SP inference cannot serve; the message says what to change."""


class TokenizerError(RaisedAlike, ValueError):
    """Tokenizer files, a checkpoint's tokenizer facts or a chat template that cannot work together; the message
    says what to change."""


class CheckpointError(RaisedAlike, RuntimeError):
    """A checkpoint that cannot be loaded as asked; the message says which flag to change."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint whose files do not match its manifest (checkpoint/integrity.py); the message names the files.
    The ranks agree on the verification before raising, so every rank raises it."""


class SaveFailed(CheckpointError):
    """A save that failed on some rank: nothing was committed, the previous checkpoint stays the latest. Raised on
    every rank; `reported` is True on the one rank that printed the message."""

    def __init__(self, message: str, reported: bool = False):
        super().__init__(message)
        self.reported = reported


class SkipThresholdExceeded(RaisedAlike, RuntimeError):
    """Too large a fraction of the dataset was skipped; raised early so a broken dataset stops the run. The training
    step judges the fraction over all data-parallel ranks (one host reduction), so every rank raises it."""


# ------------------------------------------------------------------------------------------------------
# Plans, inputs and modules: programming or input errors met where they are computed
# ------------------------------------------------------------------------------------------------------

class PlanError(RaisedLocally, ValueError):
    """A sequence layout the sharding plan cannot serve."""


class RoutingError(RaisedLocally, ValueError):
    """Frame token positions that do not fit the sequence plan."""


class AssignmentError(RaisedLocally, ValueError):
    """Frame costs or rank counts that cannot be assigned."""


class LongVILAInputError(RaisedLocally, ValueError):
    """A micro-batch the model cannot take; the message says what is wrong."""


class BatchError(RaisedLocally, ValueError):
    """A micro-batch that the MM-SP plan cannot serve as given."""


class MMSPRuntimeError(RaisedLocally, RuntimeError):
    """A forward pass that does not match the MM-SP setup (wrong batch sharding, missing plan, ...)."""


class BackendUnavailable(RaisedLocally, RuntimeError):
    """A requested attention backend cannot run here; the message says why and what to use instead."""


class VisionConfigError(RaisedLocally, ValueError):
    """A vision encoder configuration or input that cannot run."""


class ProjectorError(RaisedLocally, ValueError):
    """A projector configuration or input that cannot run."""


class FreezingError(RaisedLocally, ValueError):
    """A freezing preset or module that does not exist."""


class RegistryError(RaisedLocally, KeyError):
    """A name missing from a registry table; the message lists the known names."""

    def __str__(self) -> str:  # KeyError quotes its argument; the message reads better without
        return str(self.args[0]) if self.args else ""


class OffloadError(RaisedLocally, ValueError):
    """Recompute or offload settings that cannot run with the model."""


class StepError(RaisedLocally, RuntimeError):
    """A step that cannot run as set up; the message says what to change."""


class DataDisagreement(RaisedLocally, RuntimeError):
    """The ranks of one model-parallel replica would train on different data (training.data_feed's fingerprint);
    raised by the replica's reader, naming the ranks and the sample."""


class PlacementError(RaisedLocally, RuntimeError):
    """Groups that must share a node (TP, Ulysses) but do not, where the ranks actually run."""


class OptimizerStateError(RaisedLocally, RuntimeError):
    """An optimizer state that does not match the optimizer it is loaded into."""


class TEKeywordError(RaisedLocally, RuntimeError):
    """The installed Transformer Engine lacks a keyword whose non-default value matters."""


class DistributedRunError(RaisedLocally, RuntimeError):
    """A rank of a local multi-process run (parallel.launch.run_distributed) raised, died, or the run timed out."""


# ------------------------------------------------------------------------------------------------------
# Data: one bad sample is counted and skipped; a missing backend stops the run
# ------------------------------------------------------------------------------------------------------

DATA_REASONS = {
    "malformed_manifest": "a manifest line is not a JSON object in the expected conversation format",
    "missing_file": "a media file named by the sample does not exist",
    "empty_file": "a media file has zero bytes",
    "unreadable_file": "a media file exists but reading it failed (an I/O error, e.g. a failing network file system)",
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
"""Every reason a DataError gives (data.errors.REASONS). Tools and dashboards key on these strings: keep them stable."""


class DataError(RaisedLocally, Exception):
    """One bad sample. `reason` is a key of `DATA_REASONS`; `message` says what and where."""

    def __init__(self, reason: str, message: str):
        if reason not in DATA_REASONS:
            raise ValueError(f"unknown DataError reason {reason!r}; known: {sorted(DATA_REASONS)}")
        super().__init__(f"[{reason}] {message}")
        self.reason = reason
        self.message = message

    def __reduce__(self):  # picklable across DataLoader worker processes
        return (type(self), (self.reason, self.message))


class BackendUnavailableError(RaisedLocally, RuntimeError):
    """A decoding backend was asked for but cannot run here (not installed, no GPU). Not a data problem:
    it stops the run instead of being counted as a skip."""


# ------------------------------------------------------------------------------------------------------
# Faults: reported once by the rank that knew, then every rank exits
# ------------------------------------------------------------------------------------------------------

FAULT_EXIT_CODE = 3
"""Exit status of every rank of a job ended by a fault (a hang, a lost rank, a non-finite step, a failed save)."""


class FaultExit(RaisedLocally, SystemExit):
    """Ends this rank after a fault: the message was printed once already, by the rank that knew it, so this exits
    with FAULT_EXIT_CODE and prints nothing (no traceback on any rank)."""

    def __init__(self, message: str = ""):
        super().__init__(FAULT_EXIT_CODE)
        self.message = message
