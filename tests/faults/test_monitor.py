"""The failure monitor's rules, in one process (no launcher): who prints an error (runtime.entry.run_main), the
--data-path check before any model, the watchdog's store traffic per tick and its bound at 1,024 ranks, and a
stalled step diagnosed from the marked synchronization points when no rank waits inside torch.distributed (NCCL).
"""

import json

import pytest
import torch.distributed as dist

from megatron_longvila.errors import ArgumentError
from megatron_longvila.runtime import entry, file_view
from megatron_longvila.training import watchdog as wdmod
from megatron_longvila.training.arguments import check_data_paths
from megatron_longvila.training.faults import INJECT_ENV, InjectedFault, injections_from_env


class FakePeers:
    def __init__(self, printed: bool):
        self.printed = printed
        self.calls = []

    def post_failure(self, text, *, alike):
        self.calls.append(("post", text, alike))

    def mark_printed(self):
        self.calls.append(("mark_printed",))

    def wait_printed(self, timeout_s):
        self.calls.append(("wait_printed", timeout_s))
        return self.printed

    def wait_acknowledged(self):
        self.calls.append(("wait_acknowledged",))


def _fail(e):
    def fn():
        raise e
    return fn


@pytest.fixture
def peers(monkeypatch):
    def make(rank, printed=True):
        p = FakePeers(printed)
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setattr(entry, "_PEERS", [p])
        monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
        return p
    return make


def test_alike_error_prints_once_from_rank0_and_is_posted(peers, capsys):
    p = peers(0)
    assert entry.run_main(_fail(ArgumentError("--seq-length 7: give a multiple of 8"))) == 2
    assert capsys.readouterr().err == "error: ArgumentError: --seq-length 7: give a multiple of 8\n"
    assert p.calls == [("mark_printed",), ("post", "ArgumentError: --seq-length 7: give a multiple of 8", True),
                       ("wait_acknowledged",)]


def test_alike_error_on_another_rank_is_silent_when_rank0_printed_it(peers, capsys):
    p = peers(3, printed=True)
    assert entry.run_main(_fail(ArgumentError("bad"))) == 2
    assert capsys.readouterr().err == ""
    assert p.calls[0] == ("post", "ArgumentError: bad", True) and p.calls[1] == ("wait_printed", entry.ALIKE_WAIT_S)


def test_alike_error_rank0_did_not_raise_is_printed_by_its_rank(peers, capsys):
    p = peers(3, printed=False)
    assert entry.run_main(_fail(ArgumentError("--data-path m.jsonl cannot be read"))) == 2
    assert capsys.readouterr().err == "[rank 3] error: ArgumentError: --data-path m.jsonl cannot be read\n"
    assert ("mark_printed",) in p.calls and p.calls[-1] == ("wait_acknowledged",)


def test_local_error_is_printed_by_its_rank_with_traceback_and_posted(peers, capsys):
    p = peers(2)
    assert entry.run_main(_fail(InjectedFault("rank 2: start-up fault"))) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert err.rstrip().splitlines()[-1] == "[rank 2] error: InjectedFault: rank 2: start-up fault"
    assert p.calls == [("post", "InjectedFault: rank 2: start-up fault", False), ("wait_acknowledged",)]


def test_no_peers_keeps_the_single_process_behaviour(monkeypatch, capsys):
    monkeypatch.setattr(entry, "_PEERS", [None])
    monkeypatch.delenv("RANK", raising=False)
    assert entry.run_main(_fail(RuntimeError("boom"))) == 1
    assert capsys.readouterr().err.rstrip().endswith("[rank 0] error: RuntimeError: boom")
    assert entry.run_main(lambda: None) == 0


def test_data_path_checked_before_any_model(tmp_path, monkeypatch):
    class A:
        valid_data_path = None

    a = A()
    a.data_path = str(tmp_path / "missing.jsonl")
    with pytest.raises(ArgumentError, match=r"^--data-path .*missing\.jsonl does not exist: give a JSON Lines"):
        check_data_paths(a)
    a.data_path = str(tmp_path)
    with pytest.raises(ArgumentError, match=r"is a folder"):
        check_data_paths(a)
    m = tmp_path / "m.jsonl"
    m.write_text("{}\n")
    a.data_path = str(m)
    check_data_paths(a)
    a.valid_data_path = str(tmp_path / "v.jsonl")
    with pytest.raises(ArgumentError, match=r"^--valid-data-path "):
        check_data_paths(a)
    # One rank's failing file system (the test-only view): this rank cannot read what exists.
    a.valid_data_path = None
    monkeypatch.setenv(file_view.HIDE_ENV, f"eio@0:{m}")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(file_view, "_rules", None)
    with pytest.raises(ArgumentError, match=r"m\.jsonl cannot be read \(Input/output error"):
        check_data_paths(a)
    monkeypatch.setattr(file_view, "_rules", None)


def test_startup_injection_parses(monkeypatch):
    monkeypatch.setenv(INJECT_ENV, "startup@0:rank=2")
    (inj,) = injections_from_env()
    assert inj.kind == "startup" and inj.rank == 2


# ------------------------------------------------------------------------------------------------------
# The watchdog against a fake store
# ------------------------------------------------------------------------------------------------------

class CountingStore:
    """A dict with TCPStore's calls, counting them; reading a heartbeat advances its sequence (a live rank)."""

    host, port = "127.0.0.1", 0

    def __init__(self):
        self.kv = {}
        self.ops = 0

    def set(self, k, v):
        self.ops += 1
        self.kv[k] = v.encode() if isinstance(v, str) else v

    def get(self, k):
        self.ops += 1
        v = self.kv[k]
        if "/hb/" in k:
            beat = json.loads(v)
            beat["seq"] += 1
            self.kv[k] = json.dumps(beat).encode()
        return v

    def check(self, keys):
        self.ops += 1
        return all(k in self.kv for k in keys)

    def add(self, k, n):
        self.ops += 1
        self.kv[k] = str(int(self.kv.get(k, b"0")) + n).encode()
        return int(self.kv[k])

    def multi_get(self, keys):
        self.ops += 1
        return [self.kv[k] for k in keys]


def _watchdog(monkeypatch, world, interval=1.0, rank=0):
    monkeypatch.setattr(dist, "get_rank", lambda *a, **k: rank)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: world)
    store = CountingStore()
    wd = wdmod.Watchdog(wdmod.WatchdogConfig(interval_s=interval), store, prefix="t", resume=lambda: "resume")
    for r in range(world):
        store.kv[f"t/who/{r}"] = json.dumps({"host": f"other{r}", "pid": 1}).encode()
    return wd, store


def test_heartbeat_traffic_is_bounded_at_1024_ranks(monkeypatch):
    wd, store = _watchdog(monkeypatch, 1024)
    wd._tick()  # the first tick also reads who runs where (once)
    store.ops = 0
    for _ in range(10):
        wd._tick()
    assert store.ops == 10 * wdmod.OPS_PER_TICK
    # 1,024 ranks: a tick of 10.24 s (not the 1 s asked), 200 store operations per second from all of them.
    assert wd.cfg.interval_s == pytest.approx(10.24)
    assert 1024 * wdmod.OPS_PER_TICK / wd.cfg.interval_s == pytest.approx(wdmod.STORE_OPS_BUDGET)
    for world in (2, 8, 64, 100):
        assert wdmod.tick_seconds(1.0, world) == 1.0  # small jobs keep --watchdog-interval
    assert wdmod.tick_seconds(1.0, 16384) * wdmod.STORE_OPS_BUDGET == pytest.approx(2 * 16384)


def test_stalled_step_names_the_rank_behind_without_collectives_in_view(monkeypatch):
    """NCCL: nobody's main thread is inside torch.distributed; ranks 0, 2, 3 wait at the step totals (their
    `.cpu()`), rank 1 never left micro-batch 1's forward-backward. The marks name rank 1 and only rank 1."""
    monkeypatch.setattr(wdmod.time, "sleep", lambda s: None)
    wd, store = _watchdog(monkeypatch, 4, interval=0.01)
    wd.begin_step(5)
    wdmod._CURRENT[0] = wd
    try:
        wdmod.mark("step totals")
    finally:
        wdmod._CURRENT[0] = None
    for r, (at, mb) in {1: ("forward-backward", 1), 2: ("step totals", None), 3: ("step totals", None)}.items():
        store.kv[f"t/hb/{r}"] = json.dumps({"seq": 1, "it": 5, "phase": "step", "at": at, "mb": mb, "waiting": "",
                                            "where": "loop.py:1 in f"}).encode()
    out = wd._culprits(5, after_error=False)
    assert out == ["rank 1 has not reached iteration 5, step totals: it is at iteration 5, forward-backward of "
                   "micro-batch 1 (at loop.py:1 in f)"], out
