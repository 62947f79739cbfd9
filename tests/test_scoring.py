"""Explanation scoring by detection and fuzzing (delphi's scorers on our client): answer parsing,
balanced accuracy, the shuffled derangement, examples from our tables, and scoring, caching and a
killed-then-resumed job against a real local HTTP server whose answers are right for the right
explanation."""

import io
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from fake_server import FakeEndpoint
from mmsae.evaluate.scoring import all_cached, balanced_accuracy, build_tasks, derangement, explained_features, score_tasks, summarise
from mmsae.evaluate.scoring_examples import collect_examples
from mmsae.evaluate.scoring_prompts import highlight_tokens, parse_predictions
from mmsae.explain import EndpointConfig, Explainer
from mmsae.explain.cache import ResponseCache

WORDS = {0: " apple", 1: " river", 2: " candle", 3: " tiger"}
FILLER = [" the", " a", " of", " and", " to", " in", " is", " it", " on", " was", " for", " as", " at", " by"]


@pytest.mark.parametrize("text,n,expect", [
    ("[1,0,1]", 3, ([1, 0, 1], "ok")),
    ("Sure! Here you go: [1, 0, 1]\nthat is all", 3, ([1, 0, 1], "ok")),
    ("[True, false, 1]", 3, ([1, 0, 1], "ok")),
    ("['1', '0']", 2, ([1, 0], "ok")),
    ("[1,0]", 3, (None, "malformed")),          # one entry short
    ("[1,0,1,1]", 3, (None, "malformed")),      # one too many
    ("[1,2,0]", 3, (None, "malformed")),        # not 0/1
    ("1, 0, 1", 3, (None, "malformed")),        # no list
    ("[] [1,0,1]", 3, (None, "malformed")),     # delphi reads the first list only
    ("", 3, (None, "malformed")),
    (None, 3, (None, "malformed")),
])
def test_parse_predictions(text, n, expect):
    assert parse_predictions(text, n) == expect


def test_balanced_accuracy_hand_values():
    assert balanced_accuracy([1, 1, 1, 0, 0], [1, 0, 1, 0, 1]) == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert balanced_accuracy([1, 0, 0, 0], [1, 1, 0, 0]) == pytest.approx((1 + 2 / 3) / 2)
    assert balanced_accuracy([1, 1, 0, 0], [0, 0, 1, 1]) == 0.0
    assert balanced_accuracy([1, 1, 0, 0], [1, None, 0, None]) == 1.0  # no prediction: left out, as delphi
    assert balanced_accuracy([1, 1, 0, 0], [None, None, 0, 0]) is None  # no activating example predicted
    assert balanced_accuracy([1, 1], [1, 1]) is None  # no non-activating example
    with pytest.raises(ValueError):
        balanced_accuracy([1, 0], [1])


def test_derangement_has_no_fixed_points_and_is_seeded():
    for n in range(2, 30):
        for seed in range(20):
            perm = derangement(n, seed)
            assert sorted(perm) == list(range(n))
            assert all(p != i for i, p in enumerate(perm))
    assert derangement(12, 3) == derangement(12, 3) and derangement(12, 3) != derangement(12, 4)
    assert derangement(0, 0) == []
    with pytest.raises(ValueError, match="at least 2"):
        derangement(1, 0)


def test_highlight_marks_runs_like_delphi():
    assert highlight_tokens([" a", " b", " c", " d"], {1, 2}) == " a<< b c>> d"
    assert highlight_tokens(["<image>", " x", " y"], [False, True, False]) == "<< x>> y"


# --- a synthetic corpus: feature f fires on the word WORDS[f] and nowhere else -------------------

def make_tables(root: Path, n_per_word: int = 5, n_neutral: int = 8, seed: int = 0):
    """Samples, codes shards + manifest, top contexts and explanations, written under ``root``."""
    rng = np.random.default_rng(seed)
    samples, codes, contexts = [], [], []
    sid = 0
    for f, w in list(WORDS.items()) + [(None, None)] * 1:
        for r in range(n_per_word if f is not None else n_neutral):
            tokens = ["<|im_start|>", "user", "\n"] + [FILLER[i] for i in rng.integers(len(FILLER), size=14)]
            focus = None
            if f is not None:
                focus = int(rng.integers(5, len(tokens) - 2))
                tokens[focus] = w
            s = f"s{sid:03d}"
            sid += 1
            samples.append({"sample_id": s, "image_path": None, "tokens": tokens})
            if f is not None:
                codes.append({"sample_id": s, "token_index": focus, "modality": "text", "view": -1, "patch_row": None,
                              "patch_col": None, "feature": f, "activation": 2.0 + r})
                lo, hi = max(0, focus - 12), min(len(tokens), focus + 5)
                acts = [0.0] * (hi - lo)
                acts[focus - lo] = 2.0 + r
                contexts.append({"feature": f, "rank": r, "sample_id": s, "score": 2.0 + r, "tokens": tokens[lo:hi],
                                 "activations": acts, "focus": focus - lo})
    (root / "codes").mkdir(parents=True, exist_ok=True)
    pl.DataFrame(codes, schema={"sample_id": pl.String, "token_index": pl.Int32, "modality": pl.String, "view": pl.Int16,
                                "patch_row": pl.Int16, "patch_col": pl.Int16, "feature": pl.Int32,
                                "activation": pl.Float32}).write_parquet(root / "codes" / "shard-0.parquet")
    (root / "codes" / "manifest.json").write_text(json.dumps({"shards": [{"path": "shard-0.parquet"}]}))
    pl.DataFrame(samples, schema={"sample_id": pl.String, "image_path": pl.String,
                                  "tokens": pl.List(pl.String)}).write_parquet(root / "samples.parquet")
    pl.DataFrame(contexts).write_parquet(root / "contexts.parquet")
    expl = [{"feature": f, "kind": "text", "status": "ok", "explanation": f"the word{w}"} for f, w in WORDS.items()]
    pl.DataFrame(expl).write_parquet(root / "explanations.parquet")


def load_tasks(root: Path, n_examples: int = 6, seed: int = 0):
    """The scorer requests for the synthetic tables (what the rule's script does before sending)."""
    from mmsae.codes.schema import scan_codes
    from mmsae.core.shards import shard_paths
    explained = explained_features(pl.read_parquet(root / "explanations.parquet"), True, None)
    maps = pl.DataFrame(schema={"feature": pl.Int32, "rank": pl.Int16, "sample_id": pl.String, "highlight": pl.String,
                                "n_active_patches": pl.Int32})
    ex = collect_examples(explained, contexts=pl.read_parquet(root / "contexts.parquet"), maps=maps, maps_dir=root,
                          codes=scan_codes(shard_paths(root / "codes" / "manifest.json")),
                          samples=pl.read_parquet(root / "samples.parquet"), n_examples=n_examples, seed=seed, side=1)
    return build_tasks(explained, ex, seed)


def oracle(body: dict) -> str:
    """A scorer that is right when the explanation is: 'the word X' -> 1 for an example containing X
    (detection), or whose every marked span contains X (fuzzing)."""
    prompt = body["messages"][-1]["content"]
    word = re.search(r"Latent explanation: the word (\S+)", prompt).group(1)
    fuzz = "<<" in body["messages"][0]["content"]
    out = []
    for line in re.findall(r"^Example \d+: (.*)$", prompt, re.M):
        if fuzz:
            spans = re.findall(r"<<(.*?)>>", line)
            out.append(int(bool(spans) and all(word in s for s in spans)))
        else:
            out.append(int(word in line))
    return "[" + ",".join(map(str, out)) + "]"


def scorer(url: str, tmp: Path, **kw) -> Explainer:
    cfg = EndpointConfig(base_url=url, model="scorer", max_tokens=32, backoff_s=0.05, max_backoff_s=0.2, timeout_s=5, **kw)
    return Explainer(cfg, ResponseCache(tmp / "cache.sqlite"))


def test_examples_from_tables_are_labelled_by_where_the_feature_fires(tmp_path):
    make_tables(tmp_path)
    tasks = load_tasks(tmp_path)
    assert len(tasks) == 4 * 2 * 2  # features x methods x (real, shuffled)
    for t in tasks:
        assert t.messages is not None and sorted(t.labels) == [0, 0, 0, 1, 1, 1]
        lines = re.findall(r"^Example \d+: (.*)$", t.messages[-1]["content"], re.M)
        word = WORDS[t.feature]
        for line, y in zip(lines, t.labels):
            assert (word in line) == bool(y)  # negatives are windows where the feature is 0
            if t.method == "fuzzing":
                spans = re.findall(r"<<(.*?)>>", line)
                assert spans and (y == 1) == all(word in s for s in spans)
    shuffled = [t for t in tasks if t.kind == "shuffled"]
    assert all(t.explanation_of != t.feature for t in shuffled)
    # the same examples in the same order under both explanations
    real = {(t.feature, t.method): t for t in tasks if t.kind == "real"}
    for t in shuffled:
        r = real[(t.feature, t.method)]
        assert t.labels == r.labels
        assert t.messages[-1]["content"].split("Text examples:")[1] == r.messages[-1]["content"].split("Text examples:")[1]


def test_right_explanations_score_one_and_shuffled_lower_then_cached(tmp_path):
    make_tables(tmp_path)
    tasks = load_tasks(tmp_path)
    with FakeEndpoint(reply=oracle) as ep:
        table = score_tasks(tasks, scorer(ep.base_url, tmp_path))
        assert ep.requests == len(tasks)
        df = pl.from_arrow(table)
        assert df["status"].to_list() == ["ok"] * len(tasks)
        real = df.filter(pl.col("explanation_kind") == "real")["balanced_accuracy"]
        shuffled = df.filter(pl.col("explanation_kind") == "shuffled")["balanced_accuracy"]
        assert real.to_list() == [1.0] * 8
        assert shuffled.max() <= 0.5
        summary = summarise(table)
        means = {(g["method"], g["explanation_kind"]): g["mean_balanced_accuracy"] for g in summary["overall"]}
        assert means[("detection", "real")] == 1.0 and means[("fuzzing", "real")] == 1.0
        assert means[("detection", "shuffled")] < 1.0 and means[("fuzzing", "shuffled")] < 1.0
        ex = scorer(ep.base_url, tmp_path)
        assert all_cached(load_tasks(tmp_path), ex.cache, ex.cfg)  # the rule then starts no endpoint
        assert not all_cached(load_tasks(tmp_path, seed=1), ex.cache, ex.cfg)
        again = score_tasks(load_tasks(tmp_path), scorer(ep.base_url, tmp_path))
        assert ep.requests == len(tasks)  # a rerun is answered from the cache
        assert all(again.column("cached").to_pylist())
        assert again.drop_columns(["cached"]).equals(table.drop_columns(["cached"]))


def test_malformed_and_failed_answers_are_recorded_not_counted(tmp_path):
    make_tables(tmp_path)
    tasks = [t for t in load_tasks(tmp_path) if t.method == "detection" and t.kind == "real"][:2]
    with FakeEndpoint(reply="I think [1, 1] maybe") as ep:  # a list of the wrong length
        df = pl.from_arrow(score_tasks(tasks[:1], scorer(ep.base_url, tmp_path / "a")))
    assert df["status"].to_list() == ["malformed"] and df["balanced_accuracy"].to_list() == [None]
    assert df["raw_response"].to_list() == ["I think [1, 1] maybe"] and df["n_predicted"].to_list() == [0]
    with FakeEndpoint(default=503) as ep:
        table = score_tasks(tasks, scorer(ep.base_url, tmp_path / "b", retries=1))
        assert ep.requests == 4  # each retried once
    df = pl.from_arrow(table)
    assert df["status"].to_list() == ["failed", "failed"] and "503" in df["error"][0]
    assert df["balanced_accuracy"].null_count() == 2
    g = summarise(table)["overall"][0]
    assert g["n_failed"] == 2 and g["n_scored"] == 0 and g["mean_balanced_accuracy"] is None
    with FakeEndpoint(reply=oracle) as ep:  # failures were not cached: a rerun asks again
        again = pl.from_arrow(score_tasks(tasks, scorer(ep.base_url, tmp_path / "b")))
        assert ep.requests == 2 and again["balanced_accuracy"].to_list() == [1.0, 1.0]


CHILD = """
import sys
sys.path.insert(0, sys.argv[3])
from pathlib import Path
from test_scoring import load_tasks, scorer
from mmsae.evaluate.scoring import score_tasks
root = Path(sys.argv[1])
score_tasks(load_tasks(root), scorer(sys.argv[2], root))
"""


def test_killed_job_resumes_without_repeating_answered_requests(tmp_path):
    make_tables(tmp_path)
    n = len(load_tasks(tmp_path))
    with FakeEndpoint(reply=oracle, latency_s=0.15) as ep:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), ep.base_url, str(Path(__file__).parent)])
        deadline = time.time() + 120
        while ep.requests < 6 and time.time() < deadline:
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        child.wait()
        done = len(ResponseCache(tmp_path / "cache.sqlite"))
        assert 0 < done < n
        before = ep.requests
        table = score_tasks(load_tasks(tmp_path), scorer(ep.base_url, tmp_path))
        assert ep.requests - before == n - done  # only the unanswered requests are sent again
    df = pl.from_arrow(table)
    assert df["cached"].sum() == done and df["status"].to_list() == ["ok"] * n
    assert df.filter(pl.col("explanation_kind") == "real")["balanced_accuracy"].to_list() == [1.0] * 8


def _png(path: Path, colour) -> None:
    Image.new("RGB", (32, 32), colour).save(path)


def test_image_examples_plain_for_detection_highlighted_for_fuzzing(tmp_path):
    """Detection shows the top images and inactive ones unhighlighted; fuzzing the map's highlight
    for the top images and a random region on inactive ones."""
    imgs = []
    for i in range(6):
        arr = np.full((32, 32, 3), 40 * i, np.uint8)
        arr[:16] = 255 - 40 * i
        p = tmp_path / f"img{i}.png"
        Image.fromarray(arr).save(p)
        imgs.append(str(p))
    samples = pl.DataFrame({"sample_id": [f"s{i}" for i in range(6)], "image_path": imgs,
                            "tokens": [["<image>", " hi"]] * 6})
    codes = pl.DataFrame({"sample_id": ["s0", "s1"], "token_index": [0, 0], "modality": ["image", "image"],
                          "view": [0, 0], "patch_row": [0, 0], "patch_col": [0, 0], "feature": [7, 7],
                          "activation": [1.0, 2.0]}).lazy()
    (tmp_path / "maps").mkdir()
    for r, s in enumerate(["s1", "s0"]):
        _png(tmp_path / "maps" / f"{r}.png", (255, 0, 0))
    maps = pl.DataFrame({"feature": [7, 7], "rank": [0, 1], "sample_id": ["s1", "s0"],
                         "highlight": ["0.png", "1.png"], "n_active_patches": [1, 1]})
    ex = collect_examples([(7, "image", "bright tops")], contexts=pl.DataFrame(), maps=maps, maps_dir=tmp_path / "maps",
                          codes=codes, samples=samples, n_examples=4, seed=0, side=2)
    det, fuzz = ex[(7, "detection")], ex[(7, "fuzzing")]
    assert [y for _, y in det] == [1, 1, 0, 0] and [y for _, y in fuzz] == [1, 1, 0, 0]
    decoded = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b, _ in det]
    originals = [np.asarray(Image.open(p).convert("RGB")) for p in imgs]
    assert np.array_equal(decoded[0], originals[1]) and np.array_equal(decoded[1], originals[0])  # plain top images
    for d in decoded[2:]:  # inactive images (not s0, s1), plain
        assert any(np.array_equal(d, o) for o in originals[2:])
    assert fuzz[0][0] == (tmp_path / "maps" / "0.png").read_bytes()  # the map's own highlight
    for (b, _), (plain, _) in zip(fuzz[2:], det[2:]):  # a random region kept, the rest darkened
        h, p = np.asarray(Image.open(io.BytesIO(b))).astype(int), np.asarray(Image.open(io.BytesIO(plain))).astype(int)
        assert (h <= p).all() and (h < p).any()
    tasks = build_tasks([(7, "image", "bright tops"), (8, "image", "x")], ex, 0)
    msgs = [t for t in tasks if t.feature == 7 and t.method == "detection" and t.kind == "real"][0].messages
    assert sum(c["type"] == "image_url" for c in msgs[-1]["content"]) == 4
    assert [t.messages for t in tasks if t.feature == 8] == [None] * 4  # no examples: nothing to send


def test_report_section_shows_real_vs_shuffled_per_method_and_feature(tmp_path):
    from mmsae.evaluate.scoring import SCORING_SCHEMA
    from mmsae.report.page import ReportInputs, build_report
    from report_inputs import EVIL, inputs
    import pyarrow as pa

    def row(f, method, kind, ba, status="ok", of=None):
        return {"feature": f, "modality": "text", "category": "object", "method": method, "explanation_kind": kind,
                "explanation": f"word {f} {EVIL}", "explanation_of": of if of is not None else f, "n_examples": 6,
                "n_activating": 3, "n_predicted": 6 if ba is not None else 0, "balanced_accuracy": ba,
                "labels": [1, 1, 1, 0, 0, 0], "predictions": None, "status": status, "error": None,
                "raw_response": None, "cached": False, "latency_s": None, "prompt_tokens": None,
                "completion_tokens": None, "scorer_model": "m", "prompt_version": "v1"}
    rows = [row(9, "detection", "real", 0.875), row(9, "detection", "shuffled", 0.25, of=7),
            row(9, "fuzzing", "real", None, "malformed"), row(9, "fuzzing", "shuffled", 0.5, of=7),
            row(7, "detection", "real", 0.625), row(7, "detection", "shuffled", 0.375, of=9),
            row(7, "fuzzing", "real", 1.0), row(7, "fuzzing", "shuffled", 0.5, of=9)]
    table = pa.Table.from_pylist(rows, schema=SCORING_SCHEMA)
    page = build_report(ReportInputs(**inputs(tmp_path), scoring=summarise(table), scoring_table=pl.from_arrow(table)))
    section = page.split("id=scoring>")[1]
    assert EVIL not in page
    assert "0.750" in section and "0.312" in section  # detection means: real (0.875+0.625)/2, shuffled (0.25+0.375)/2
    assert "1 failed" in section and "malformed" in section  # feature 9's fuzzing answer, not counted
    assert "category: object" in section and "(shuffled: feature 7's)" in section
    assert "Explanation scoring" not in build_report(ReportInputs(**inputs(tmp_path)))  # no scoring input: no section


def test_a_remote_scorer_without_a_url_is_a_config_error():
    import yaml
    from mmsae.workflow.config_check import config_errors
    cfg = yaml.safe_load((Path(__file__).parents[1] / "config.yaml").read_text())
    cfg["explain"]["enabled"] = True  # the schema's default, filled before the check in a run
    cfg["scoring"] = {"enabled": True, "scorer": {"server": "remote", "base_url": None}}
    assert any("scoring.scorer.base_url" in e for e in config_errors(cfg))
    cfg["scoring"]["scorer"]["base_url"] = "http://127.0.0.1:9/v1"
    assert not any("scoring" in e for e in config_errors(cfg))
