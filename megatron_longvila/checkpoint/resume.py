"""One resume decision per job: every rank loads the same iteration of --load, or the job stops at start-up.

    agree_resume(load) -> int | None     every rank reports what it sees in `load`; the iteration all of them see
                                         (None: no checkpoint, on every rank), else CheckpointError on every rank
    check_loaded(load, iteration)        after the load: every rank loaded the same iteration, else CheckpointError
    ResumeView                           what one rank sees in `load` (the tracker, the iteration folder, the files
                                         every rank's load opens)

Why: each rank reads the tracker itself. A rank whose view of a network file system is stale (or failing) sees no
checkpoint, or an older one, where its peers see the latest; it then builds another model or skips the load while
its peers wait for it inside the load's collectives, and the job hangs without a message until the group timeout.
Here the ranks compare their views with one all-gather on a host (gloo) group before anything is built; any
difference raises the same CheckpointError on every rank (printed once, by rank 0, through runtime.entry.run_main),
naming the ranks that differ, what each saw, and the folder exactly as given to --load.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch.distributed as dist

from ..errors import CheckpointError
from ..runtime.file_view import check_readable, visible
from .integrity import MANIFEST, agreement_group
from .layout import TRACKER, checkpoint_dir, committed_folder, read_tracker

__all__ = ["ResumeView", "agree_resume", "check_loaded", "view_of", "COMMON_FILES"]

COMMON_FILES = (".metadata", "metadata.json", "common.pt", MANIFEST, "model_record.json")
"""Files of an iteration folder that every rank's load opens (torch_dist's metadata, megatron-core's common state and
metadata, the project's manifest and model record), probed at start-up where present. The shards are not: each rank
reads only some of them, and opening every shard from every rank would load the file system's metadata server."""


@dataclass(frozen=True)
class ResumeView:
    """What one rank sees in --load."""

    iteration: Optional[int]
    """The iteration the tracker names; None when this rank sees no tracker (or cannot read it)."""
    folder: Optional[str]
    """The name of the iteration folder it would load (iter_N, or iter_N.old mid re-save); None without one."""
    files: Tuple[str, ...]
    """Which of COMMON_FILES this rank sees in that folder."""
    error: Optional[str]
    """Why this rank cannot read what it would load (the tracker, the folder or one of `files`); None when it can."""

    def describe(self, expected_files: Tuple[str, ...] = ()) -> str:
        if self.iteration is None:
            return self.error or f"no checkpoint (no {TRACKER})"
        text = f"iteration {self.iteration}" + (f" ({self.folder})" if self.folder else "")
        lacks = [f for f in expected_files if f not in self.files]
        if lacks and self.folder:
            text += f" without {', '.join(lacks)}"
        return text + (f", but {self.error}" if self.error else "")


def _probe(path: str) -> None:
    """Open `path` and read a byte: a failing network read or a stale handle shows here, not mid-load."""
    check_readable(path)
    with open(path, "rb") as f:
        f.read(1)


def view_of(load: str) -> ResumeView:
    """What this rank sees in `load` (never raises for the files' sake: an error is part of the view)."""
    try:
        iteration = read_tracker(load) if visible(load) else None
    except CheckpointError as e:  # layout's message names the tracker and the error
        return ResumeView(None, None, (), str(e))
    except OSError as e:
        return ResumeView(None, None, (), f"{os.path.join(load, TRACKER)} is unreadable ({_one_line(e)})")
    if iteration is None:
        return ResumeView(None, None, (), None)
    try:
        folder = committed_folder(load, iteration)
    except CheckpointError:
        return ResumeView(iteration, None, (), f"its folder {os.path.basename(checkpoint_dir(load, iteration))} is "
                                               f"missing")
    seen, error = [], None
    for name in COMMON_FILES:
        path = os.path.join(folder, name)
        if not visible(path):
            continue
        seen.append(name)
        if error is None:
            try:
                _probe(path)
            except OSError as e:
                error = f"{os.path.basename(folder)}/{name} is unreadable: {_one_line(e)}"
    return ResumeView(iteration, os.path.basename(folder), tuple(seen), error)


def agree_resume(load: Optional[str]) -> Optional[int]:
    """The iteration every rank resumes from in `load` (None: no rank sees a checkpoint there, or no --load).
    Every rank calls it, before anything is built from the checkpoint; collective over the world (a host group)."""
    if not load:
        return None
    mine = view_of(load)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        views = [(mine, socket.gethostname())]
    else:
        gathered: List[Optional[tuple]] = [None] * world
        dist.all_gather_object(gathered, (mine, socket.gethostname()), group=agreement_group())
        views = gathered
    distinct = {v for v, _ in views}
    if len(distinct) == 1:
        if mine.error is not None:
            raise CheckpointError(f"--load {load}, on every rank: {mine.describe()}. Repair the checkpoint folder, or "
                                  f"give a --load that holds a readable checkpoint")
        return mine.iteration
    raise CheckpointError(_mismatch(load, views))


def check_loaded(load: str, iteration: Optional[int]) -> None:
    """After a load: every rank loaded the same iteration (None: loaded nothing), else CheckpointError on every rank.
    Collective over the world (a host group); one small all-gather."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        return
    gathered: List[Optional[tuple]] = [None] * world
    dist.all_gather_object(gathered, (iteration, socket.gethostname()), group=agreement_group())
    if len({it for it, _ in gathered}) == 1:
        return
    groups = _by_value([(it, host) for it, host in gathered])
    lines = [f"  {_ranks(ranks)} ({_hosts(hosts)}): "
             + ("nothing" if it is None else f"iteration {it}") for it, ranks, hosts in groups]
    raise CheckpointError(
        f"[checkpoint] the ranks loaded different iterations from --load {load}:\n" + "\n".join(lines)
        + f"\nThe checkpoint changed during the load, or a rank's view of {load} differs from its peers': no rank "
          f"trains from a mixed state. Check that no other job writes to {load}, then rerun with the same flags.")


def _mismatch(load: str, views: List[tuple]) -> str:
    """The message when the ranks' views differ: each view with its ranks, the minority named first."""
    files = tuple(sorted({f for v, _ in views for f in v.files}, key=COMMON_FILES.index))
    groups = sorted(_by_value(views), key=lambda g: (len(g[1]), g[1][0]))  # the smallest groups first
    # The majority view is what the peers load; the ranks of every other view cannot see or read it. Without a
    # majority no view is the peers': every host is named.
    majority = len(groups[-1][1]) > len(groups[-2][1])
    odd = sorted(r for _, ranks, _ in (groups[:-1] if majority else groups) for r in ranks)
    lines = [f"  {_ranks(ranks)} ({_hosts(hosts)}): {view.describe(files)}" for view, ranks, hosts in groups]
    odd_hosts = sorted({views[r][1] for r in odd})
    who = (f"{_ranks(odd).capitalize()} cannot see or read what {'its' if len(odd) == 1 else 'their'} peers load"
           if majority else "No view is shared by most ranks")
    return (f"[checkpoint] the ranks see different checkpoints in --load {load}; every rank must resume from the "
            f"same iteration, so the job stops before loading anything:\n" + "\n".join(lines)
            + f"\n{who}: check {load} on {_hosts(odd_hosts)} (a stale or failing network file system mount: compare "
              f"`ls -la {load}` there with a healthy node's), then rerun with the same flags.")


def _by_value(items: List[tuple]) -> List[list]:
    """[(value, [ranks], [hosts])] in order of first appearance."""
    out: Dict[object, list] = {}
    for r, (value, host) in enumerate(items):
        g = out.setdefault(value, [value, [], []])
        g[1].append(r)
        if host not in g[2]:
            g[2].append(host)
    return list(out.values())


def _ranks(ranks: List[int]) -> str:
    """"rank 3", "ranks 0-2", "ranks 0, 2, 5-7"."""
    ranks = sorted(ranks)
    parts, start = [], ranks[0]
    for a, b in zip(ranks, ranks[1:] + [None]):
        if b != a + 1:
            parts.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(parts)


def _hosts(hosts: List[str]) -> str:
    return ("host " if len(hosts) == 1 else "hosts ") + ", ".join(hosts)


def _one_line(e: BaseException) -> str:
    text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)  # the path is named by the caller
    text = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(e).__name__}: {text}"[:300]
