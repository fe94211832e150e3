"""A save's success, agreed by every rank at each phase (instead of a barrier).

    SaveAgreement(iteration, save_dir, final)   .failed(what, e), .add_entries, .post_entries, .all_entries, .check
    SAVE_ERRORS                                 what a save catches and reports through the agreement
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d
from torch.distributed.checkpoint import CheckpointException

from ..errors import SaveFailed
from ..runtime.entry import report, run_prefix
from .integrity import agreement_group
from .layout import TRACKER, read_tracker

__all__ = ["SaveAgreement", "SAVE_ERRORS"]

SAVE_ERRORS = (Exception, CheckpointException)
"""What a save catches and reports: torch's CheckpointException is a BaseException."""

_SAVES = [0]


class SaveAgreement:
    """One save's success, agreed by every rank at each phase (instead of a barrier).

    A rank that failed posts its error in the job's store, then joins a sum of failure flags on a gloo group; it
    waits for the others only GRACE_S (a peer may be stuck in a collective that this rank left), while ranks that
    succeeded wait for everyone (a dead peer fails the sum at once). Any failure, or any lost peer, raises
    SaveFailed on every rank, with one message printed by the first rank that failed (or, with none posted, by the
    first to notice)."""

    GRACE_S = 10.0

    def __init__(self, iteration: int, save_dir: str, final: str):
        _SAVES[0] += 1
        self.iteration, self.save_dir, self.final = iteration, save_dir, final
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.group = agreement_group() if self.world > 1 else None
        self.store = dist.PrefixStore(f"{run_prefix()}/ckpt/{_SAVES[0]}/", c10d._get_default_store()) \
            if self.world > 1 else None
        self.error: Optional[str] = None
        self.secondary = False  # this rank failed only because torch's writer reported another rank's failure
        self.entries: Dict[str, dict] = {}
        self.t0 = time.time()

    def failed(self, what: str, e: BaseException) -> None:
        if self.error is None:
            self.error = _error_text(e)
            # torch_dist's writer raises on every rank; only its coordinator holds the failing ranks' errors.
            self.secondary = isinstance(getattr(e, "failures", None), dict) and not e.failures

    def add_entries(self, folder: str, entries: Dict[str, dict]) -> None:
        for path, e in entries.items():
            self.entries[os.path.relpath(path, folder).replace(os.sep, "/") if os.path.isabs(path) else path] = e

    def post_entries(self) -> None:
        if self.store is not None and self.error is None:
            self.store.set(f"entries/{self.rank}", json.dumps(self.entries))

    def all_entries(self) -> Dict[str, dict]:
        if self.store is None:
            return dict(self.entries)
        out = {}
        for value in self.store.multi_get([f"entries/{r}" for r in range(self.world)]):
            out.update(json.loads(value))
        return out

    def check(self, phase: str) -> None:
        """All ranks call this at the end of each phase; returns only when every rank succeeded."""
        ok = self.error is None
        if self.world == 1:
            if not ok:
                raise self._failure(phase, [(self.rank, self.error)], None)
            return
        if not ok and not self.secondary:
            try:
                i = self.store.add(f"{phase}/nfail", 1)
                self.store.set(f"{phase}/fail/{i}", json.dumps([self.rank, self.error]))
            except Exception:  # noqa: BLE001  (a store that is gone: this rank still reports its own error)
                pass
        flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
        lost = None
        try:
            work = dist.all_reduce(flag, group=self.group, async_op=True)
            if ok:
                work.wait()
            else:
                work.wait(timeout=datetime.timedelta(seconds=self.GRACE_S))
        except Exception as e:  # noqa: BLE001  (a dead peer, or the grace ran out)
            lost = e
        if ok and lost is None and int(flag) == 0:
            return
        raise self._failure(phase, self._posted(phase), lost)

    def _posted(self, phase: str) -> List[Tuple[int, str]]:
        """The failures ranks posted (their own errors), waiting up to GRACE_S for a first one."""
        out = []
        try:
            deadline = time.monotonic() + self.GRACE_S
            while self.store.add(f"{phase}/nfail", 0) == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            n = self.store.add(f"{phase}/nfail", 0)
            for i in range(1, n + 1):
                r, text = json.loads(self.store.get(f"{phase}/fail/{i}"))
                out.append((r, text))
        except Exception:  # noqa: BLE001
            if self.error is not None:
                out = [(self.rank, self.error)]
        return out

    def _failure(self, phase: str, posted: List[Tuple[int, str]], lost: Optional[BaseException]):
        if posted:
            reporter = posted[0][0] == self.rank
        else:
            try:
                reporter = self.store.add(f"{phase}/report", 1) == 1
            except Exception:  # noqa: BLE001
                reporter = self.rank == 0
        causes = [t if t.startswith("rank ") else f"rank {r}: {t}" for r, t in posted]
        if lost is not None and not posted:
            causes.append(f"a rank stopped or died during the save (rank {self.rank} lost contact: "
                          f"{_error_text(lost)})")
        try:
            prev = read_tracker(self.save_dir)
        except Exception:  # noqa: BLE001
            prev = None
        kept = (f"{os.path.join(self.save_dir, TRACKER)} still names iteration {prev}, "
                f"which is untouched and loadable" if prev is not None else "no earlier checkpoint exists")
        try:
            free = (f" ({shutil.disk_usage(self.save_dir).free / 2**30:.1f} GiB free there now, seen from rank "
                    f"{self.rank})")
        except OSError:
            free = ""
        msg = (f"[checkpoint] saving iteration {self.iteration} to {self.final} failed ({phase}):\n"
               + "\n".join("  " + c for c in causes)
               + f"\nNothing of iteration {self.iteration} was committed: {kept}. Every rank exits with status 3. "
                 f"Next: free disk space, or fix the quota or permissions of {self.save_dir}{free}, then resume with "
                 f"--load {self.save_dir} (the next save removes the partial folder).")
        if reporter:
            report(msg, since=self.t0)
        return SaveFailed(msg, reported=reporter)


def _error_text(e: BaseException) -> str:
    """An exception in one line; torch's CheckpointException holds the failing ranks' own exceptions."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        parts = []
        for r, wrapped in sorted(failures.items()):
            exc = wrapped[0] if isinstance(wrapped, tuple) else wrapped
            root = exc
            while getattr(root, "__cause__", None) is not None:
                root = root.__cause__
            parts.append(f"rank {r}: {type(root).__name__}: {root}")
        return "; ".join(parts)
    root = e
    while getattr(root, "__cause__", None) is not None and not isinstance(root, OSError):
        root = root.__cause__
    text = str(root).strip().splitlines()[0] if str(root).strip() else ""
    return f"{type(root).__name__}: {text}"[:500]
