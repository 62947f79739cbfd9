"""Explanation client against real servers: scripted faults, cache, concurrency across processes,
and a round trip with images through `transformers serve` serving the demo model."""

import asyncio
import io
import json
import multiprocessing
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from mmsae.explain import EndpointConfig, Explainer, build_requests, explain_features
from mmsae.explain.cache import ResponseCache
from fake_server import FakeEndpoint
from mmsae.explain.prompts import image_messages, parse_response, text_messages
from mmsae.explain.server import LocalServer, free_port


def _png(seed=0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _explainer(base_url, tmp_path, **kw):
    cfg = EndpointConfig(base_url=base_url, model="m", backoff_s=0.05, max_backoff_s=0.5, timeout_s=kw.pop("timeout_s", 5), **kw)
    return Explainer(cfg, ResponseCache(tmp_path / "cache.sqlite"))


@pytest.mark.parametrize("text,expect", [
    ("The regions show fur.\n[EXPLANATION]: cat fur", ("cat fur", "ok")),
    ("**[Explanation]:** Red circles.", ("Red circles", "ok")),
    ("[EXPLANATION]: Unable to produce descriptions", (None, "no_explanation")),
    ("I think they are all dogs", ("I think they are all dogs", "untagged")),
    ("\n\n  \n", (None, "unparsed")),
    ("[EXPLANATION]:   ", (None, "unparsed")),
    (None, (None, "unparsed")),
])
def test_parse_response(text, expect):
    assert parse_response(text) == expect


def test_messages_carry_images_and_marked_tokens():
    m = image_messages([_png(0), _png(1)])
    parts = m[0]["content"]
    assert parts[0]["type"] == "text" and "2 images" in parts[0]["text"] and "[EXPLANATION]" in parts[0]["text"]
    assert [p["image_url"]["url"][:22] for p in parts[1:]] == ["data:image/png;base64,"] * 2
    t = text_messages([(["The", " cat", " sat"], [0.0, 2.0, 0.1])])
    assert "The« cat» sat" in t[0]["content"]


def test_retries_through_500_429_garbage_then_answers(tmp_path):
    with FakeEndpoint(script=[500, ("429", 0.3), "garbage", "nochoices"]) as ep:
        ex = _explainer(ep.base_url, tmp_path, retries=4)
        t0 = time.monotonic()
        ans = asyncio.run(ex.complete_all([image_messages([_png()])]))[0]
        assert time.monotonic() - t0 >= 0.3  # Retry-After was honoured
        assert ans["content"] == "[EXPLANATION]: red circles" and ans["attempts"] == 5 and ep.requests == 5


def test_http_errors_are_retried_by_the_openai_client_within_one_budget(tmp_path):
    """5xx/429 are retried by the openai client itself (its retry-count header climbs); a malformed
    200 is resent by tenacity; both draw on one budget of ``retries`` resends."""
    with FakeEndpoint(script=[500, 503, "ok"]) as ep:
        ans = asyncio.run(_explainer(ep.base_url, tmp_path, retries=3).complete_all([image_messages([_png()])]))[0]
        assert ans["content"] and ans["attempts"] == 3 and ep.retry_counts == ["0", "1", "2"]
    with FakeEndpoint(script=[500, "garbage", 500, "garbage", 500]) as ep:
        ans = asyncio.run(_explainer(ep.base_url, tmp_path / "b", retries=3).complete_all([image_messages([_png(1)])]))[0]
        assert ans["content"] is None and "malformed" in ans["error"] and ans["attempts"] == 4 and ep.requests == 4


def test_failures_are_recorded_not_dropped(tmp_path):
    with FakeEndpoint(default=503) as ep:
        ex = _explainer(ep.base_url, tmp_path, retries=2)
        table = explain_features([(7, "image", 1, image_messages([_png()]))], ex)
        row = table.to_pylist()[0]
        assert row["feature"] == 7 and row["status"] == "failed" and "503" in row["error"] and ep.requests == 3
    with FakeEndpoint(default=400) as ep:  # a client error is not retried
        ex = _explainer(ep.base_url, tmp_path, retries=3)
        row = explain_features([(8, "text", 1, text_messages([(["a"], [1.0])]))], ex).to_pylist()[0]
        assert row["status"] == "failed" and "400" in row["error"] and ep.requests == 1


def test_timeouts_and_refused_connections_are_retried(tmp_path):
    with FakeEndpoint(script=[("slow", 2.0)]) as ep:
        ex = _explainer(ep.base_url, tmp_path, retries=1, timeout_s=0.5)
        ans = asyncio.run(ex.complete_all([image_messages([_png()])]))[0]
        assert ans["content"] is not None and ans["attempts"] == 2
    ex = _explainer(f"http://127.0.0.1:{free_port()}/v1", tmp_path / "x", retries=2)
    ans = asyncio.run(ex.complete_all([image_messages([_png(3)])]))[0]
    assert ans["content"] is None and "connection" in ans["error"].lower() and ans["attempts"] == 3


def test_cache_second_run_sends_nothing(tmp_path):
    reqs = [(f, "image", 1, image_messages([_png(f)])) for f in range(4)]
    with FakeEndpoint(script=[500]) as ep:
        first = explain_features(reqs, _explainer(ep.base_url, tmp_path, retries=2))
        assert ep.requests == 5 and all(s == "ok" for s in first.column("status").to_pylist())
        second = explain_features(reqs, _explainer(ep.base_url, tmp_path))
        assert ep.requests == 5 and all(second.column("cached").to_pylist())
        # another sampling parameter is another request
        explain_features(reqs[:1], _explainer(ep.base_url, tmp_path, max_tokens=99))
        assert ep.requests == 6
    assert len(ResponseCache(tmp_path / "cache.sqlite")) == 5


CHILD = """
import asyncio, sys
from mmsae.explain import EndpointConfig, Explainer
from mmsae.explain.cache import ResponseCache
url, slots, cache, tag = sys.argv[1:5]
cfg = EndpointConfig(base_url=url, model="m", concurrency=3)
ex = Explainer(cfg, ResponseCache(cache), slots_dir=slots)
msgs = [[{"role": "user", "content": f"{tag} {i}"}] for i in range(8)]
res = asyncio.run(ex.complete_all(msgs))
assert all(r["content"] for r in res), res
"""


def _open_and_put(path, start_at, results):
    while time.time() < start_at:
        pass
    try:
        ResponseCache(path).put(f"k{multiprocessing.current_process().pid}", "m", {"content": "x"})
        results.put("ok")
    except Exception as e:  # reported to the parent, which asserts on it
        results.put(repr(e))


def test_processes_creating_one_cache_together_all_succeed(tmp_path):
    """Chunk jobs start together on a new cache file; none may die of "database is locked"
    (CI once saw exactly that from ``PRAGMA journal_mode=WAL``; 8 of 180 opens failed before the fix)."""
    ctx = multiprocessing.get_context("fork")
    outcomes = []
    for trial in range(20):
        path, results = tmp_path / f"c{trial}.sqlite", ctx.Queue()
        start_at = time.time() + 0.2
        procs = [ctx.Process(target=_open_and_put, args=(path, start_at, results)) for _ in range(6)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        outcomes += [results.get(timeout=5) for _ in procs]
        assert len(ResponseCache(path)) == 6
    assert [o for o in outcomes if o != "ok"] == []


def test_concurrency_bounded_across_processes(tmp_path):
    with FakeEndpoint(latency_s=0.25) as ep:
        procs = [subprocess.Popen([sys.executable, "-c", CHILD, ep.base_url, str(tmp_path / "slots"),
                                   str(tmp_path / "cache.sqlite"), tag]) for tag in ("a", "b")]
        assert [p.wait(timeout=120) for p in procs] == [0, 0]
        assert ep.requests == 16
        assert 2 <= ep.max_in_flight <= 3


def test_api_key_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MMSAE_TEST_KEY", "sk-test-secret-123")
    with FakeEndpoint() as ep:
        ex = _explainer(ep.base_url, tmp_path, api_key_env="MMSAE_TEST_KEY")
        explain_features([(1, "text", 1, text_messages([(["a"], [1.0])]))], ex)
        assert ep.auth_headers == ["Bearer sk-test-secret-123"]
    monkeypatch.delenv("MMSAE_TEST_KEY")
    with pytest.raises(KeyError, match="MMSAE_TEST_KEY"):
        _explainer(ep.base_url, tmp_path, api_key_env="MMSAE_TEST_KEY")


@pytest.mark.slow
def test_transformers_serve_round_trip_with_images(demo_model_dir, tmp_path):
    maps_dir = tmp_path / "maps"
    maps_dir.mkdir()
    for i in range(2):
        (maps_dir / f"{i}.png").write_bytes(_png(i))
    maps = pl.DataFrame({"feature": [3, 3], "rank": [0, 1], "highlight": ["0.png", "1.png"]})
    contexts = pl.DataFrame({"feature": [4], "rank": [0], "tokens": [["Paris", " is", " nice"]], "activations": [[3.0, 0.0, 0.0]]})
    reqs = build_requests([3, 4, 5], maps, contexts, maps_dir)
    assert [(f, k, n) for f, k, n, _ in reqs] == [(3, "image", 2), (4, "text", 1)]
    with LocalServer(demo_model_dir, log_path=tmp_path / "serve.log") as srv:
        cfg = EndpointConfig(base_url=srv.base_url, model=srv.model, max_tokens=16, concurrency=1)
        table = explain_features(reqs, Explainer(cfg, ResponseCache(tmp_path / "c.sqlite")))
        assert srv.request_count() == 2
        rows = table.to_pylist()
        assert all(r["error"] is None and r["status"] in ("ok", "untagged", "unparsed", "no_explanation") for r in rows)
        assert rows[0]["prompt_tokens"] > 2 * 64  # both images reached the model as image tokens
        again = explain_features(reqs, Explainer(cfg, ResponseCache(tmp_path / "c.sqlite")))
        assert srv.request_count() == 2 and all(again.column("cached").to_pylist())
    assert srv.proc.poll() is not None  # stopped on exit
