"""Progress of long work (#32.5): explanation and scoring requests, and the per-item loops of
evaluation, neurons, steering and attribution, write their count, rate and ETA to the job's log (the
logging module), not only to a terminal bar."""

import asyncio
import logging

import pytest

from fake_server import FakeEndpoint
from mmsae.explain import EndpointConfig, Explainer, explain_features
from mmsae.explain.cache import ResponseCache
from mmsae.explain.prompts import text_messages


def _progress_lines(caplog, label):
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{label}: ")]


def _text_requests(n):
    return [(f, "text", 1, text_messages([([" word", f" w{f}"], [0.0, 1.0 + f])])) for f in range(n)]


def test_explain_logs_its_request_counts(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    reqs = _text_requests(6)
    cfg = EndpointConfig(base_url=None, model="m", timeout_s=5, concurrency=2)
    with FakeEndpoint(latency_s=0.02) as ep:
        cfg.base_url = ep.base_url
        table = explain_features(reqs, Explainer(cfg, ResponseCache(tmp_path / "c.sqlite")))
        assert ep.requests == 6 and table.num_rows == 6
        lines = _progress_lines(caplog, "explain")
        assert lines and lines[-1].startswith("explain: 6/6 requests in "), lines  # the last line, with the elapsed time
        caplog.clear()
        explain_features(reqs, Explainer(cfg, ResponseCache(tmp_path / "c.sqlite")))  # all cached: nothing sent
        assert ep.requests == 6
        assert _progress_lines(caplog, "explain") == ["explain: 6/6 requests, all answered from the cache"]


def test_explain_logs_intermediate_counts_with_rate_and_eta(tmp_path, caplog, monkeypatch):
    from mmsae.core import progress

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)  # a line per finished request
    caplog.set_level(logging.INFO)
    with FakeEndpoint(latency_s=0.02) as ep:
        cfg = EndpointConfig(base_url=ep.base_url, model="m", timeout_s=5, concurrency=1)
        explain_features(_text_requests(4), Explainer(cfg, ResponseCache(tmp_path / "c.sqlite")))
    lines = _progress_lines(caplog, "explain")
    assert [line.split(",")[0] for line in lines[:4]] == [f"explain: {i}/4 requests" for i in range(1, 5)]
    assert "/s, ETA " in lines[0] and lines[-1].startswith("explain: 4/4 requests in ")


def test_scoring_logs_its_request_counts(tmp_path, caplog):
    from test_scoring import load_tasks, make_tables, oracle, scorer

    from mmsae.evaluate.scoring import score_tasks

    caplog.set_level(logging.INFO)
    make_tables(tmp_path)
    tasks = load_tasks(tmp_path)
    with FakeEndpoint(reply=oracle) as ep:
        score_tasks(tasks, scorer(ep.base_url, tmp_path))
    lines = _progress_lines(caplog, "score")
    assert lines and lines[-1].startswith(f"score: {len(tasks)}/{len(tasks)} requests in "), lines


def test_progress_line_gives_count_rate_and_eta():
    from mmsae.core.progress import ProgressLog

    now = [0.0]
    records = []

    class _Log:
        def info(self, fmt, *args):
            records.append(fmt % args)

    p = ProgressLog("explain", 1000, "requests", every_s=30, logger=_Log(), clock=lambda: now[0])
    now[0] = 10.0
    p.update(40)  # before 30 s: no line
    now[0] = 38.7
    p.update(80)
    assert records == ["explain: 120/1000 requests, 3.1/s, ETA 4m44s"]
    now[0] = 320.0
    p.update(880)
    p.close()
    p.close()  # once
    assert records[1:] == ["explain: 1000/1000 requests, 3.12/s, ETA 0s", "explain: 1000/1000 requests in 5m20s, 3.12/s"]


def test_track_and_gather_log_per_item(caplog):
    from mmsae.core.progress import gather, track

    caplog.set_level(logging.INFO)
    assert list(track(["a", "b", "c"], "steer", unit="prompts", every_s=0, bar=False)) == ["a", "b", "c"]
    lines = _progress_lines(caplog, "steer")
    assert [line.split(",")[0] for line in lines[:3]] == ["steer: 1/3 prompts", "steer: 2/3 prompts", "steer: 3/3 prompts"]
    assert lines[-1].startswith("steer: 3/3 prompts in ")

    async def later(i):
        await asyncio.sleep(0.01 * (3 - i))  # finish in reverse order
        return i

    assert asyncio.run(gather((later(i) for i in range(3)), "score", every_s=0, bar=False)) == [0, 1, 2]
    assert _progress_lines(caplog, "score")[-1].startswith("score: 3/3 requests in ")
    with pytest.raises(ZeroDivisionError):  # a loop that fails still logs how far it got
        for i in track(range(5), "evaluate", unit="pairs", every_s=1e9, bar=False):
            1 / (2 - i)
    assert _progress_lines(caplog, "evaluate") == [_progress_lines(caplog, "evaluate")[0]]
    assert _progress_lines(caplog, "evaluate")[0].startswith("evaluate: 2/5 pairs in ")
