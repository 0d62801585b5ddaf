"""The collective watchdog with a real TCP store and real processes: a frozen (SIGSTOPped)
peer, a peer somewhere else, a store whose host froze, and peers that are merely slow."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch.distributed as dist

from megamor.parallel import dist as pdist
from megamor.parallel.env import free_port
from megamor.parallel.watchdog import KEY, Watchdog, open_store

LIMIT = 2.0


class Exits:
    def __init__(self) -> None:
        self.codes: list[int] = []

    def __call__(self, code: int) -> None:
        self.codes.append(code)


def _server() -> tuple[object, int]:
    port = free_port()
    return dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False), port


def _peer_process(port: int, rank: int, step: int, phase: str) -> subprocess.Popen:
    """Another rank: beats into the store from its own process, its main thread parked at (step, phase)."""
    code = textwrap.dedent(f"""
        import time
        from megamor.parallel.watchdog import Watchdog, open_store
        w = Watchdog({rank}, 2, {LIMIT}, open_store("127.0.0.1", {port}, 5.0), exit_fn=lambda c: None)
        w.at({step}, {phase!r})
        w.start()
        time.sleep(120)
    """)
    return subprocess.Popen([sys.executable, "-c", code])


def _wait_for_key(store, rank: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not store.check([KEY.format(rank=rank)]):
        assert time.time() < deadline, "the peer never beat"
        time.sleep(0.1)


def _wait_fired(w: Watchdog, timeout: float) -> None:
    deadline = time.time() + timeout
    while w.fired is None and time.time() < deadline:
        time.sleep(0.05)


def test_frozen_peer_is_named_and_the_waiting_rank_exits_75(capsys):
    """Issue 32: rank 1 SIGSTOPped; rank 0, inside an all_reduce of step 13, exits 75 within the
    limit naming step, collective and rank 1, runs its exit hooks and kills the frozen rank."""
    server, port = _server()
    peer = _peer_process(port, 1, 12, "logging")
    exits, hooks = Exits(), []
    try:
        _wait_for_key(server, 1)
        peer.send_signal(signal.SIGSTOP)
        w = Watchdog(0, 2, LIMIT, open_store("127.0.0.1", port, 1.0), exit_fn=exits)
        w.on_fire.append(lambda: hooks.append("lock released"))
        t0 = time.monotonic()
        with pdist._in("all_reduce"):  # the main thread, as pdist.all_reduce_ marks it
            w.at(13, "train step")
            w.start()
            _wait_fired(w, 10 * LIMIT)
        w.stop()
        assert exits.codes == [75] and hooks == ["lock released"]
        assert LIMIT <= time.monotonic() - t0 < 10 * LIMIT  # fired at the limit, not at the 10x wait's end
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("megamor.train:")]
        assert len(lines) == 1, lines
        assert "rank 0: stuck for 2 s at step 13 in all_reduce (train step): rank 1 stopped answering" in lines[0]
        assert "last heartbeat: step 12 logging" in lines[0] and "exiting 75" in lines[0]
        assert peer.wait(timeout=10) == -signal.SIGKILL  # the frozen rank on this host does not linger
    finally:
        peer.kill()
        peer.wait()


def test_live_peer_elsewhere_is_named():
    _srv, port = _server()  # held: the store lives as long as this
    exits = Exits()
    w1 = Watchdog(1, 2, LIMIT, open_store("127.0.0.1", port, 1.0), exit_fn=exits)
    w0 = Watchdog(0, 2, LIMIT, open_store("127.0.0.1", port, 1.0), exit_fn=exits)
    w1.at(12, "checkpoint save")
    w0.at(13, "train step")
    w1.start()
    w0.start()
    _wait_fired(w0, 10 * LIMIT)
    w0.stop()
    w1.stop()
    assert w0.fired is not None and "rank 1 at step 12 checkpoint save" in w0.fired
    assert "stopped answering" not in w0.fired
    assert "train step (a collective inside DeepSpeed or the model)" in w0.fired


def test_peer_that_never_beat_is_silent_not_a_dead_store():
    _srv, port = _server()  # held: the store lives as long as this
    w = Watchdog(0, 2, LIMIT, open_store("127.0.0.1", port, 30.0), exit_fn=Exits())
    w.at(3, "train step")
    w.start()
    _wait_fired(w, 10 * LIMIT)
    w.stop()
    assert w.fired is not None and "rank 1 stopped answering" in w.fired and "last heartbeat: no heartbeat yet" in w.fired


def test_slow_peers_at_the_same_place_are_waited_for(capsys):
    """Every rank alive and in the same phase (a long compile, a slow save): no exit, one warning."""
    _srv, port = _server()  # held: the store lives as long as this
    exits = Exits()
    # Both watchdogs share this process's GIL: at 2 s a thread starved for 1 s on a loaded machine
    # would read as a silent peer. The heartbeats' and store calls' margins scale with the limit.
    limit = 2 * LIMIT
    ws = [Watchdog(r, 2, limit, open_store("127.0.0.1", port, 2.0), exit_fn=exits) for r in (0, 1)]
    for w in ws:
        w.at(1, "train step")
        w.start()
    time.sleep(3 * limit)
    for w in ws:
        w.stop()
    assert exits.codes == [] and all(w.fired is None for w in ws)
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "every rank answers" in ln]
    assert len(warnings) == 2  # once per rank and place


def test_store_host_frozen_is_reported():
    """The store lives in rank 0's process (srun, deepspeed launcher): rank 0 frozen, the store too."""
    port = free_port()
    host = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time, torch.distributed as dist
        s = dist.TCPStore("127.0.0.1", {port}, is_master=True, wait_for_workers=False)
        s.set("ready", "1")
        time.sleep(120)
    """)])
    try:
        store = open_store("127.0.0.1", port, 1.0)
        deadline = time.time() + 60
        while store is None and time.time() < deadline:  # the server starts with the interpreter
            time.sleep(0.5)
            store = open_store("127.0.0.1", port, 1.0)
        store.wait(["ready"])
        w = Watchdog(1, 2, LIMIT, store, exit_fn=Exits())
        w.at(7, "train step")
        w._beat()
        host.send_signal(signal.SIGSTOP)
        w.start()
        _wait_fired(w, 10 * LIMIT)
        w.stop()
        assert w.fired is not None and "the process group's store" in w.fired and "does not answer" in w.fired
    finally:
        host.kill()
        host.wait()


@pytest.mark.parametrize("world, limit", [(1, 20.0), (2, 0.0)])
def test_single_process_or_limit_zero_starts_nothing(world, limit):
    _srv, port = _server()
    w = Watchdog(0, world, limit, open_store("127.0.0.1", port, 1.0)).start()
    assert not w.enabled and w._thread is None
    w.at(1, "train step")
    assert w.diagnose() is None


def test_unreachable_store_is_one_warning_line_and_no_watchdog(capsys):
    port = free_port()  # nothing listens there
    store = open_store("127.0.0.1", port, 1.0)
    assert store is None and not Watchdog(0, 2, LIMIT, store).start().enabled
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("megamor: watchdog:")]
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "frame #" not in lines[0]


def test_peer_lost_follows_a_recorded_failure_with_1_else_75():
    """A rank cut off by a peer's exit fails too when that peer recorded a failure (a requeue
    would repeat the error), and exits 75 when it did not (a watchdog fired, or it was killed)."""
    _srv, port = _server()  # held: the store lives as long as this
    w0, w1 = (Watchdog(r, 2, LIMIT, open_store("127.0.0.1", port, 1.0), exit_fn=Exits()) for r in (0, 1))
    w0.at(7, "train step")
    closed = RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:1234")
    code, line = w0.peer_lost(closed)
    assert code == 75 and "exiting 75 (the job is requeued" in line
    assert w0.peer_lost(ValueError("some other error")) is None
    w1.record_failure()
    code, line = w0.peer_lost(closed)
    assert code == 1 and "rank 0: at step 7 (train step)" in line and "rank 1 failed" in line and "exiting 1" in line
