"""The local explainer server never outlives its job, and a job whose answers are all cached
starts none (reliability issue #33, item 1).

The server process is a stand-in (``stand_in_server.py``: answers ``/health``, loads no model)
started through the real :class:`~mmsae.explain.server.LocalServer` mechanism; the round trip
through ``transformers serve`` itself is in ``test_explain.py``."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fake_server import FakeEndpoint
from mmsae.evaluate.refine import refine_all
from mmsae.explain import Explainer, endpoint_session, explain_features
from mmsae.explain.cache import ResponseCache, request_key
from mmsae.explain.prompts import text_messages
from mmsae.explain.server import LocalServer, process_start_time, reap_orphans

STAND_IN = [sys.executable, str(Path(__file__).with_name("stand_in_server.py"))]

# A job process: starts a server, prints its PID, then waits to be killed.
JOB = """
import sys, time
import mmsae.explain.server as server
if sys.argv[3] == "no-pdeathsig":  # as on a system without prctl: only the records are left
    server._die_with_parent = lambda parent: None
srv = server.LocalServer(sys.argv[1], pid_dir=sys.argv[2], command=%r, startup_timeout_s=30)
srv.start()
print(srv.proc.pid, flush=True)
time.sleep(600)
""" % (STAND_IN,)

LINUX = sys.platform.startswith("linux")


def _job(tmp_path, mode="normal"):
    """Start a job process holding a server; returns (job, server pid)."""
    job = subprocess.Popen([sys.executable, "-c", JOB, str(tmp_path), str(tmp_path / "servers"), mode],
                           stdout=subprocess.PIPE, text=True)
    pid = int(job.stdout.readline())
    assert process_start_time(pid) is not None
    return job, pid


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process_start_time(pid) is None:
            return True
        time.sleep(0.1)
    return False


def _kill9(job):
    job.send_signal(signal.SIGKILL)
    job.wait(timeout=10)
    job.stdout.close()


@pytest.mark.skipif(not LINUX, reason="PR_SET_PDEATHSIG is Linux-only")
def test_server_dies_when_its_job_is_killed(tmp_path):
    job, pid = _job(tmp_path)
    assert list((tmp_path / "servers").glob("server-*.json"))  # its record
    _kill9(job)
    assert _gone_within(pid, 10), f"server {pid} outlived its job"


@pytest.mark.skipif(not LINUX, reason="reads /proc")
def test_next_start_kills_a_server_left_behind(tmp_path):
    job, pid = _job(tmp_path, "no-pdeathsig")
    try:
        _kill9(job)
        time.sleep(0.5)
        assert process_start_time(pid) is not None  # left behind: only the record knows it
        with LocalServer(tmp_path, pid_dir=tmp_path / "servers", command=STAND_IN, startup_timeout_s=30) as srv:
            assert _gone_within(pid, 10)
            records = [p.name for p in (tmp_path / "servers").glob("server-*.json")]
            assert records == [f"server-{srv.proc.pid}.json"]
            assert reap_orphans(tmp_path / "servers") == []  # a live job's server is left alone
            assert srv.proc.poll() is None
        assert not list((tmp_path / "servers").glob("server-*.json"))  # dropped on a clean stop
    finally:
        if process_start_time(pid) is not None:
            os.kill(pid, signal.SIGKILL)


def test_a_record_of_a_reused_pid_is_not_killed(tmp_path):
    """A record whose server PID now belongs to another process (other start time) kills nothing."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import json
        import socket
        from mmsae.explain.server import _boot_id
        d = tmp_path / "servers"
        d.mkdir()
        (d / f"server-{other.pid}.json").write_text(json.dumps(
            {"host": socket.gethostname(), "boot_id": _boot_id(), "pid": other.pid, "start": 1,
             "parent_pid": 2**22 + 1, "parent_start": 1, "port": 1, "model": "m"}))
        (d / "server-9.json").write_text("{not json")
        assert reap_orphans(d) == [] and other.poll() is None
        assert not list(d.iterdir())  # stale and unreadable records are dropped
    finally:
        other.kill()
        other.wait()


ENDPOINT = dict(server="local", temperature=0.0, max_tokens=16, extra_body={}, concurrency=2, timeout_s=5, retries=0)


def _requests():
    return [(f, "text", 1, text_messages([([f"w{f}", " x"], [1.0, 0.0])])) for f in range(3)]


def _fill(cache, model, messages_list, content="[EXPLANATION]: cached"):
    for m in messages_list:
        key = request_key(model, m, {"temperature": 0.0, "max_tokens": 16, "extra_body": {}})
        cache.put(key, model, {"content": content, "latency_s": 0.0, "prompt_tokens": 1, "completion_tokens": 1})


def test_a_fully_cached_chunk_starts_no_server(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(LocalServer, "start", lambda self: started.append(self) or "http://127.0.0.1:9/v1")
    cache = ResponseCache(tmp_path / "cache.sqlite")
    model = str(tmp_path.resolve())
    reqs = _requests()
    _fill(cache, model, [m for *_, m in reqs])
    with endpoint_session({**ENDPOINT, "local_model": str(tmp_path)}, pid_dir=str(tmp_path / "s")) as cfg:
        table = explain_features(reqs, Explainer(cfg, cache))
    assert all(table.column("cached").to_pylist()) and table.column("explanation").to_pylist() == ["cached"] * 3
    assert started == []
    # the refinement of cached explanations starts none either
    from mmsae.evaluate.refine import CATEGORY_PROMPT, REFINE_PROMPT
    _fill(cache, model, [[{"role": "user", "content": REFINE_PROMPT.format(explanation="e")}]], "red bus")
    _fill(cache, model, [[{"role": "user", "content": CATEGORY_PROMPT.format(phrase="red bus")}]], "object")
    with endpoint_session({**ENDPOINT, "local_model": str(tmp_path)}, pid_dir=str(tmp_path / "s")) as cfg:
        ex = Explainer(cfg, cache)
        rows = refine_all(ex, ex, [(1, "e")])
    assert rows[0]["phrase"] == "red bus" and rows[0]["category"] == "object" and started == []


def test_the_server_starts_once_when_a_request_must_go_out(tmp_path, monkeypatch):
    with FakeEndpoint(reply="[EXPLANATION]: fresh") as ep:
        started = []
        monkeypatch.setattr(LocalServer, "start", lambda self: started.append(self) or ep.base_url)
        cache = ResponseCache(tmp_path / "cache.sqlite")
        reqs = _requests()
        _fill(cache, str(tmp_path.resolve()), [m for *_, m in reqs[:2]])
        with endpoint_session({**ENDPOINT, "local_model": str(tmp_path)}, pid_dir=str(tmp_path / "s")) as cfg:
            ex = Explainer(cfg, cache)
            table = explain_features(reqs, ex)
            again = asyncio.run(ex.complete_all([m for *_, m in reqs]))
        assert len(started) == 1 and ep.requests == 1
        assert table.column("explanation").to_pylist() == ["cached", "cached", "fresh"]
        assert [a["cached"] for a in again] == [True] * 3
