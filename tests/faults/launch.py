"""Launch the example script under torchrun as a subprocess, as a user would, and read what it did.

envrun(argv, procs=2, env=None) starts the ranks directly (env://, rank 0 hosts the store).
torchrun(argv, nodes=1, procs=2, env=None) runs one torchrun with `procs` ranks, or `nodes` torchruns with one rank
each (a multi-node job on one host: each node's agent only watches its own rank, so a rank killed on one "node"
must be noticed by the others' own code). Returns every agent's exit status and exit time and the combined output.
Workers run in sessions of their own (torch elastic), so the helper records their pids while they run and kills any
left behind (a SIGSTOPped rank) by pid. Every process of a launch carries its mark (runtime.processes): whatever is
still alive when it ends (a killed rank's checkpoint-writer helper, which never notices its parent's death) is killed
too and listed in `helpers_left`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from megatron_longvila.runtime import processes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "examples", "pretrain_longvila.py")
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


@dataclass
class Launch:
    rcs: List[int]
    """Each agent's exit status (torchrun's), by node."""
    ends: List[float]
    """Seconds from the start to each agent's exit."""
    out: str
    """Everything the agents and ranks printed, node by node."""
    seconds: float
    started_at: float = 0.0
    """Wall-clock time (time.time()) of the start."""
    workers_left: List[int] = field(default_factory=list)
    """Worker pids still alive after the agents ended (then killed)."""
    helpers_left: List[str] = field(default_factory=list)
    """Other processes of the launch still alive after it ended (then killed), described."""

    @property
    def rc(self) -> int:
        return next((r for r in self.rcs if r != 0), 0)

    def worker_lines(self) -> List[str]:
        """Lines the ranks printed (torchrun's own failure summary and log lines left out)."""
        out, in_summary = [], False
        for line in self.out.splitlines():
            if line.startswith("====="):
                in_summary = not in_summary
                continue
            if in_summary or line.startswith(("W1", "E1", "I1", "[W", "Traceback", "  File ", "torch.distributed.")):
                continue
            out.append(line)
        return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> List[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _reap(mark: str) -> List[str]:
    """Kill what is left of a launch; describe it."""
    left = processes.marked(mark)
    out = [processes.describe(p) for p in left]
    processes.end(left)
    return out


def torchrun(argv: List[str], *, nodes: int = 1, procs: int = 2, env: Optional[Dict[str, str]] = None,
             timeout: float = 150.0) -> Launch:
    port = free_port()
    run_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    run_env.pop("MEGATRON_LONGVILA_INJECT_FAULT", None)
    run_env.update(env or {})
    mark = processes.new_mark()
    run_env = processes.with_mark(run_env, mark)
    if nodes == 1:
        cmds = [[TORCHRUN, "--nproc-per-node", str(procs), "--master-addr", "127.0.0.1", "--master-port", str(port),
                 SCRIPT, *argv]]
    else:
        cmds = [[TORCHRUN, "--nnodes", str(nodes), "--node-rank", str(i), "--nproc-per-node", "1", "--master-addr",
                 "127.0.0.1", "--master-port", str(port), SCRIPT, *argv] for i in range(nodes)]
    logs = [tempfile.TemporaryFile(mode="w+") for _ in cmds]
    t0, wall0 = time.monotonic(), time.time()
    agents = [subprocess.Popen(c, stdout=log, stderr=subprocess.STDOUT, env=run_env, cwd=ROOT)
              for c, log in zip(cmds, logs)]
    workers: set = set()
    ends: List[Optional[float]] = [None] * len(agents)
    try:
        while any(e is None for e in ends):
            for i, a in enumerate(agents):
                if ends[i] is None:
                    workers.update(_children(a.pid))
                    if a.poll() is not None:
                        ends[i] = time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                break
            time.sleep(0.05)
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
                a.wait()
        left = [w for w in workers if processes.alive(w)]
        processes.end(left)  # a stopped rank outlives its agent otherwise
        helpers = _reap(mark)
    text = []
    for i, log in enumerate(logs):
        log.seek(0)
        text.append(f"----- node {i} -----\n" + log.read())
        log.close()
    return Launch(rcs=[a.returncode for a in agents], ends=[e if e is not None else float("inf") for e in ends],
                  out="\n".join(text), seconds=time.monotonic() - t0, started_at=wall0, workers_left=left,
                  helpers_left=helpers)


def envrun(argv: List[str], *, procs: int = 2, env: Optional[Dict[str, str]] = None,
           timeout: float = 150.0) -> Launch:
    """The ranks started directly with env:// variables (no torchrun): rank 0's own process hosts the store, as in
    the CPU demo or `srun python ...`."""
    port = free_port()
    mark = processes.new_mark()
    t0, wall0 = time.monotonic(), time.time()
    logs, ranks = [], []
    ends: List[Optional[float]] = [None] * procs
    try:
        for r in range(procs):
            run_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore",
                           RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(procs), MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(port))
            run_env.pop("MEGATRON_LONGVILA_INJECT_FAULT", None)
            run_env.update(env or {})
            logs.append(tempfile.TemporaryFile(mode="w+"))
            ranks.append(subprocess.Popen([sys.executable, SCRIPT, *argv], stdout=logs[-1],
                                          stderr=subprocess.STDOUT, env=processes.with_mark(run_env, mark), cwd=ROOT))
        while any(e is None for e in ends) and time.monotonic() - t0 < timeout:
            for i, p in enumerate(ranks):
                if ends[i] is None and p.poll() is not None:
                    ends[i] = time.monotonic() - t0
            time.sleep(0.05)
    finally:
        left = [p.pid for p in ranks if p.poll() is None]
        for p in ranks:
            if p.poll() is None:
                p.kill()
                p.wait()
        # Rank 0 killed by the other rank's watchdog leaves its checkpoint writer's Manager running.
        helpers = _reap(mark)
    text = []
    for i, log in enumerate(logs):
        log.seek(0)
        text.append(f"----- rank {i} -----\n" + log.read())
        log.close()
    return Launch(rcs=[p.returncode for p in ranks], ends=[e if e is not None else float("inf") for e in ends],
                  out="\n".join(text), seconds=time.monotonic() - t0, started_at=wall0, workers_left=left,
                  helpers_left=helpers)


def losses(metrics_file: str) -> Dict[int, float]:
    """{iteration: loss} from a --metrics-file (the last record of each iteration)."""
    out = {}
    if os.path.isfile(metrics_file):
        for line in open(metrics_file):
            rec = json.loads(line)
            out[int(rec["iteration"])] = rec["loss"]
    return out


def records(metrics_file: str) -> Dict[int, dict]:
    out = {}
    for line in open(metrics_file):
        rec = json.loads(line)
        out[int(rec["iteration"])] = rec
    return out
