"""Graceful drain: SIGTERM or SIGINT lets running requests finish, refuses new ones, and exits 0."""
from __future__ import annotations

import ctypes
import os
import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.client import CartridgeClient, CartridgeError

from .conftest import start_server

COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"   # the base model keeps counting: requests that run long
STREAMS = 16


def stream_into(client: CartridgeClient, pieces: list, outcome: dict, started: threading.Event, **request) -> None:
    try:
        for piece in client.generate_stream(COUNTING, **request):
            pieces.append(piece)
            started.set()
        outcome["ok"] = True
    except CartridgeError as err:
        outcome["error"] = err
        started.set()


def health_status(channel: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1).status


def test_sigterm_lets_16_streams_finish_whole_and_refuses_new_calls():
    server = start_server("--max-batch-size", str(STREAMS), "--max-seq-len", "256", "--drain-timeout", "120")
    with CartridgeClient(server.address, timeout=120) as client, grpc.insecure_channel(server.address) as channel:
        expected = client.generate(COUNTING, max_tokens=24).text
        runs = [([], {}, threading.Event()) for _ in range(STREAMS)]
        threads = [threading.Thread(target=stream_into, args=(client, *run), kwargs=dict(max_tokens=24))
                   for run in runs]
        for thread in threads:
            thread.start()
        for _, _, started in runs:
            assert started.wait(120), "a stream never started"
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING

        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        while health_status(channel) != health_pb2.HealthCheckResponse.NOT_SERVING:
            time.sleep(0.005)
        not_serving_after = time.monotonic() - signalled
        asked = time.monotonic()
        with pytest.raises(CartridgeError) as refused:
            client.generate("hello", max_tokens=2)
        refused_in = time.monotonic() - asked
        still_running = sum(thread.is_alive() for thread in threads)

        for thread in threads:
            thread.join(120)
        server.process.wait(60)
        exited_after = time.monotonic() - signalled

    print(f"\ndrain: NOT_SERVING {not_serving_after * 1000:.0f} ms after SIGTERM; a new call refused in "
          f"{refused_in * 1000:.0f} ms; {still_running}/{STREAMS} streams still running then; "
          f"exit {exited_after:.2f} s after SIGTERM")
    assert not_serving_after < 1.0
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE and "draining" in refused.value.message
    assert refused_in < 0.1
    assert still_running > 0, "the streams ended before the checks: this test proves nothing"
    for pieces, outcome, _ in runs:
        assert outcome.get("ok"), outcome.get("error")
        assert pieces[-1].finish_reason == "length" and pieces[-1].completion_tokens == 24
        assert "".join(p.text for p in pieces) == expected
    assert server.process.returncode == 0
    assert server.logged("drained in")


def test_requests_past_the_drain_timeout_end_with_unavailable_not_a_dropped_connection():
    server = start_server("--max-batch-size", "1", "--max-seq-len", "512", "--drain-timeout", "1")
    with CartridgeClient(server.address, timeout=120) as client:
        running = ([], {}, threading.Event())
        queued = ([], {}, threading.Event())
        threads = [threading.Thread(target=stream_into, args=(client, *run), kwargs=dict(max_tokens=450))
                   for run in (running, queued)]
        threads[0].start()
        assert running[2].wait(120)
        threads[1].start()       # waits for the only decode slot
        time.sleep(0.5)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGINT)
        for thread in threads:
            thread.join(60)
        server.process.wait(60)
        exited_after = time.monotonic() - signalled

    print(f"\ndrain timeout 1 s: exit {exited_after:.2f} s after SIGINT")
    for pieces, outcome, _ in (running, queued):
        error = outcome["error"]
        assert error.code == grpc.StatusCode.UNAVAILABLE
        assert "shut down before this request finished" in error.message and "--drain-timeout 1" in error.message
    assert 0 < len(running[0]) < 450, "the running stream kept what it had received"
    assert server.process.returncode == 0
    assert exited_after < 10


def signal_a_worker_thread(pid: int, signum: int) -> None:
    """Sends `signum` to one of `pid`'s threads other than its main one, as Linux may pick for a kill()."""
    def takes_it(tid: int) -> bool:
        status = open(f"/proc/{pid}/task/{tid}/status").read()
        blocked = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigBlk:")), 16)
        return not blocked >> (signum - 1) & 1
    worker = next(tid for tid in map(int, os.listdir(f"/proc/{pid}/task")) if tid != pid and takes_it(tid))
    SYS_TGKILL = 234   # x86-64
    assert ctypes.CDLL(None, use_errno=True).syscall(SYS_TGKILL, pid, worker, signum) == 0


def test_a_sigterm_that_lands_on_a_worker_thread_still_drains():
    server = start_server("--max-seq-len", "256")
    with CartridgeClient(server.address, timeout=120) as client:
        client.generate("hello", max_tokens=2)     # gRPC and engine threads are all running now
    signal_a_worker_thread(server.process.pid, signal.SIGTERM)
    try:
        server.process.wait(30)
    finally:
        server.process.kill()       # a no-op once it has exited
    assert server.process.returncode == 0
    assert server.logged("drained in")
