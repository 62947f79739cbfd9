"""Explanation scoring by detection and fuzzing (delphi's scorers on our client): answer parsing,
balanced accuracy, the shuffled derangement, examples from our tables, and scoring, caching and a
killed-then-resumed job against a real local HTTP server whose answers are right for the right
explanation."""

import io
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
from scoring_tables import FILLER, WORDS, load_tasks, make_tables, oracle, scorer
from mmsae.evaluate.scoring import all_cached, balanced_accuracy, build_tasks, derangement, score_tasks, summarise
from mmsae.evaluate.scoring_examples import collect_examples
from mmsae.evaluate.scoring_prompts import highlight_tokens, parse_predictions
from mmsae.explain.cache import ResponseCache



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
from scoring_tables import load_tasks, scorer
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


def test_image_examples_held_out_plain_for_detection_highlighted_for_fuzzing(tmp_path):
    """The image the explainer saw (s1) is never a test example; the held-out active image (s0) is
    shown plain for detection and with its activated region highlighted for fuzzing; inactive
    images plain, and with a random region highlighted."""
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
                          "activation": [1.0, 2.0]}, schema_overrides={"view": pl.Int16, "patch_row": pl.Int16,
                                                                      "patch_col": pl.Int16, "feature": pl.Int32}).lazy()
    ex = collect_examples([(7, "image", "bright tops")], shown={7: {"s1"}}, contexts=pl.DataFrame(), codes=codes,
                          samples=samples, seed=0, side=2)
    det, fuzz = ex[(7, "detection")], ex[(7, "fuzzing")]
    assert [e.label for e in det] == [1, 0] and [e.label for e in fuzz] == [1, 0]
    assert det[0].sample_id == "s0" and det[0].token_index == -1 and "s1" not in {e.sample_id for e in det}
    decoded = [np.asarray(Image.open(io.BytesIO(e.payload)).convert("RGB")) for e in det]
    originals = [np.asarray(Image.open(p).convert("RGB")) for p in imgs]
    assert np.array_equal(decoded[0], originals[0])  # the plain held-out image
    assert any(np.array_equal(decoded[1], o) for o in originals[2:])  # an inactive image, plain
    for f, d in zip(fuzz, det):  # highlighted: part kept, the rest darkened
        h, p = np.asarray(Image.open(io.BytesIO(f.payload))).astype(int), np.asarray(Image.open(io.BytesIO(d.payload))).astype(int)
        assert (h <= p).all() and (h < p).any()
    tasks = build_tasks([(7, "image", "bright tops"), (8, "image", "x")], ex, 0)
    msgs = [t for t in tasks if t.feature == 7 and t.method == "detection" and t.kind == "real"][0].messages
    assert sum(c["type"] == "image_url" for c in msgs[-1]["content"]) == 2
    assert [t.messages for t in tasks if t.feature == 8] == [None] * 4  # no examples: nothing to send


def test_report_section_shows_pooled_and_per_feature_real_vs_shuffled(tmp_path):
    """Pooled balanced accuracy (confusion counts summed over features) equals a hand count, and the
    per-feature mean is beside it, in the summary and in the report."""
    from mmsae.evaluate.scoring import SCORING_SCHEMA
    from mmsae.report.page import ReportInputs, build_report
    from report_inputs import EVIL, inputs
    import pyarrow as pa

    def row(f, method, kind, labels, preds, status="ok", of=None, batch=0):
        return {"feature": f, "modality": "text", "category": "object", "method": method, "explanation_kind": kind,
                "explanation": f"word {f} {EVIL}", "explanation_of": of if of is not None else f, "mode": "batch",
                "batch": batch, "examples": [], "n_examples": len(labels), "n_activating": sum(labels),
                "n_predicted": len(preds) if preds else 0, "balanced_accuracy": balanced_accuracy(labels, preds) if preds else None,
                "labels": labels, "predictions": preds, "probabilities": None, "status": status, "error": None,
                "raw_response": None, "cached": False, "latency_s": None, "prompt_tokens": None,
                "completion_tokens": None, "scorer_model": "m", "prompt_version": "v2", "prompts": "ours"}
    rows = [row(9, "detection", "real", [1, 1, 0, 0], [1, 1, 0, 0]),                       # feature 9: 1.0
            row(7, "detection", "real", [1, 1, 1], [1, 0, 0]),                             # feature 7, two requests:
            row(7, "detection", "real", [1, 0, 0], [0, 0, 0], batch=1),                    #   TPR 1/4, TNR 2/2: 0.625
            row(9, "detection", "shuffled", [1, 1, 0, 0], [0, 0, 0, 0], of=7),
            row(7, "detection", "shuffled", [1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1], of=9),
            row(9, "fuzzing", "real", [1, 0], None, "malformed"), row(9, "fuzzing", "shuffled", [1, 0], [1, 0], of=7),
            row(7, "fuzzing", "real", [1, 0], [1, 0]), row(7, "fuzzing", "shuffled", [1, 0], [1, 1], of=9)]
    table = pa.Table.from_pylist(rows, schema=SCORING_SCHEMA)
    summary = summarise(table)
    g = {(x["method"], x["explanation_kind"]): x for x in summary["overall"]}
    real = g[("detection", "real")]
    # hand count: TP 2+1, FN 0+3, TN 2+2, FP 0 -> (3/6 + 4/4) / 2
    assert real["confusion"] == {"tp": 3, "fn": 3, "tn": 4, "fp": 0}
    assert real["pooled_balanced_accuracy"] == pytest.approx(0.75)
    assert real["mean_balanced_accuracy"] == pytest.approx((1.0 + 0.625) / 2)
    assert g[("detection", "shuffled")]["pooled_balanced_accuracy"] == pytest.approx((0 / 6 + 2 / 4) / 2)
    assert g[("fuzzing", "real")]["n_failed"] == 1 and g[("fuzzing", "real")]["n_features_scored"] == 1
    page = build_report(ReportInputs(**inputs(tmp_path), scoring=summary, scoring_table=pl.from_arrow(table)))
    section = page.split("id=scoring>")[1]
    assert EVIL not in page
    assert "0.750 · 0.812" in section  # pooled · per-feature mean
    assert "1 failed" in section and "malformed" in section  # feature 9's fuzzing answer, not counted
    assert "0.62" in section  # feature 7's detection score over its two requests
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


def test_held_out_examples_disjoint_from_shown_and_span_quantiles(tmp_path):
    """From the written files: scored activating examples never include a sample the explainer was
    shown, and one is drawn from each activation-quantile bin (bins computed independently with
    numpy quantile edges over the held-out samples' per-sample max activation)."""
    from mmsae.core.io import write_parquet
    from mmsae.explain.batch import EXPLANATION_SCHEMA
    import pyarrow as pa
    rng = np.random.default_rng(3)
    samples, codes = [], []
    for k in range(40):  # feature 5 fires on a few tokens of each sample; its per-sample max is planted
        tokens = [FILLER[i] for i in rng.integers(len(FILLER), size=20)]
        samples.append({"sample_id": f"t{k:02d}", "image_path": None, "tokens": tokens})
        for j, a in ((3, 0.5), (8, 1.0 + k + 0.1 * (k % 3)), (12, 0.7)):
            codes.append({"sample_id": f"t{k:02d}", "token_index": j, "modality": "text", "view": -1, "patch_row": None,
                          "patch_col": None, "feature": 5, "activation": a})
    for k in range(30):
        samples.append({"sample_id": f"z{k:02d}", "image_path": None, "tokens": [FILLER[i] for i in rng.integers(len(FILLER), size=20)]})
    codes_df = pl.DataFrame(codes, schema={"sample_id": pl.String, "token_index": pl.Int32, "modality": pl.String, "view": pl.Int16,
                                           "patch_row": pl.Int16, "patch_col": pl.Int16, "feature": pl.Int32, "activation": pl.Float32})
    shown_ids = [f"t{k:02d}" for k in range(35, 40)]  # the top 5 by activation, as the explainer saw them
    row = {c: None for c in EXPLANATION_SCHEMA.names}
    row.update(feature=5, kind="text", status="ok", explanation="filler words", n_inputs=5,
               shown_examples=[{"sample_id": s, "token_index": 8} for s in shown_ids])
    write_parquet(tmp_path / "explanations.parquet", pa.Table.from_pylist([row], schema=EXPLANATION_SCHEMA))
    expl = pl.read_parquet(tmp_path / "explanations.parquet")
    shown = {5: {e["sample_id"] for e in expl["shown_examples"][0]}}
    ex = collect_examples([(5, "text", "filler words")], shown=shown, contexts=pl.DataFrame(), codes=codes_df.lazy(),
                          samples=pl.DataFrame(samples), seed=0, side=1, n_quantiles=5, per_quantile=1)
    tasks = build_tasks([(5, "text", "filler words")], ex, 0, batch_size=4)
    with FakeEndpoint(reply=lambda body: "[" + ",".join(["1"] * body["messages"][-1]["content"].count("Example ")) + "]") as ep:
        write_parquet(tmp_path / "scoring.parquet", score_tasks(tasks, scorer(ep.base_url, tmp_path)))
    scored = pl.read_parquet(tmp_path / "scoring.parquet")
    assert scored["status"].to_list() == ["ok"] * scored.height and scored["batch"].max() >= 1  # several requests
    shown_file = {e["sample_id"] for e in pl.read_parquet(tmp_path / "explanations.parquet")["shown_examples"][0]}
    examples = scored.select("method", "examples").explode("examples").unnest("examples")
    active = examples.filter(pl.col("activating"))
    assert set(active["sample_id"]).isdisjoint(shown_file)
    held = codes_df.filter(~pl.col("sample_id").is_in(shown_ids)).group_by("sample_id").agg(pl.col("activation").max())
    edges = np.quantile(held["activation"].to_numpy(), [0.2, 0.4, 0.6, 0.8])
    bin_of = dict(zip(held["sample_id"], np.digitize(held["activation"].to_numpy(), edges, right=True)))
    for method in ("detection", "fuzzing"):
        ids = active.filter(pl.col("method") == method)["sample_id"].to_list()
        assert sorted(bin_of[s] for s in ids) == [0, 1, 2, 3, 4]  # one per quantile bin
        focus = active.filter(pl.col("method") == method)["token_index"].to_list()
        assert focus == [8] * 5  # the window's focus: each sample's max-activating token
    neg = examples.filter(~pl.col("activating"))
    assert neg.height == 10 and not set(neg["sample_id"]) & set(codes_df["sample_id"])  # feature 0 there


def test_logprob_mode_scores_p_of_one_and_auroc_matches_hand_count(tmp_path):
    """One example per request, a one-token answer; P("1") normalised over {"0", "1"} from the
    scripted top_logprobs; AUROC and balanced accuracy at 0.5 equal hand computations."""
    from mmsae.evaluate.scoring_examples import Example
    p_of = {"alpha": 0.9, "beta": 0.4, "gamma": 0.6, "delta": 0.1}
    ex = {(3, "detection"): [Example("alpha", 1, "a", 0), Example("beta", 1, "b", 0),
                             Example("gamma", 0, "c", 0), Example("delta", 0, "d", 0)]}
    tasks = build_tasks([(3, "text", "greek letters")], ex, 0, mode="logprob")
    tasks = [t for t in tasks if t.messages is not None]
    assert len(tasks) == 4 and all(len(t.examples) == 1 for t in tasks)

    def lp(body):
        word = re.search(r"^Example 0: (\w+)", body["messages"][-1]["content"], re.M).group(1)
        p = p_of[word]
        return {"1": 0.8 * p, "0": 0.8 * (1 - p), "The": 0.2}  # the extra candidate is normalised away

    cfg = dict(max_tokens=1, extra_body={"logprobs": True, "top_logprobs": 5})
    with FakeEndpoint(reply="1", logprobs=lp) as ep:
        table = score_tasks(tasks, scorer(ep.base_url, tmp_path, **{k: v for k, v in cfg.items() if k != "max_tokens"}))
        assert all(b["logprobs"] is True and b["top_logprobs"] == 5 for b in ep.bodies)
    df = pl.from_arrow(table)
    assert df["status"].to_list() == ["ok"] * 4
    probs = {e[0]["sample_id"]: p[0] for e, p in zip(df["examples"].to_list(), df["probabilities"].to_list())}
    assert probs == pytest.approx({"a": 0.9, "b": 0.4, "c": 0.6, "d": 0.1})
    g = summarise(table)["overall"][0]
    assert g["pooled_auroc"] == pytest.approx(3 / 4)  # pairs (a>c, a>d, b<c, b>d)
    assert g["pooled_balanced_accuracy"] == pytest.approx(0.5)  # a, c predicted 1
    with FakeEndpoint(reply="0") as ep:  # an endpoint that ignores logprobs (transformers serve)
        df = pl.from_arrow(score_tasks(tasks, scorer(ep.base_url, tmp_path / "b")))
    assert df["status"].to_list() == ["no_logprobs"] * 4 and df["predictions"].to_list() == [[0]] * 4
    assert summarise(score_tasks(tasks, scorer(ep.base_url, tmp_path / "b")))["overall"][0]["pooled_auroc"] is None


def test_our_prompts_carry_no_delphi_text_and_delphi_needs_its_package():
    import inspect
    from mmsae.evaluate import scoring_prompts as sp
    src = inspect.getsource(sp)
    for phrase in ("meticulous", "tight end", "you guys", "Gronkowski", "Latent explanation", "DSCORER"[:0] + "Do not return anything else"):
        assert phrase not in src
    msgs = sp.text_messages("detection", "rivers", ["a b c"])
    assert msgs[-1]["content"].startswith("Feature description: rivers") and "Example 0: a b c" in msgs[-1]["content"]
    try:
        import importlib.metadata as md
        md.distribution("eai-delphi")
        pytest.skip("eai-delphi is installed here")
    except md.PackageNotFoundError:
        pass
    with pytest.raises(ImportError, match="eai-delphi"):
        sp.text_messages("detection", "rivers", ["a"], prompts="delphi")
    assert sp.prompt_params("delphi")["text_sha256"] == "delphi-not-installed"
    assert sp.prompt_params("ours") != sp.prompt_params("ours", "logprob")
    with pytest.raises(ValueError, match="logprob"):
        sp.text_messages("detection", "rivers", ["a"], mode="logprob", prompts="delphi")


def test_shown_examples_record_what_the_explainer_saw(tmp_path):
    from mmsae.explain.batch import shown_examples
    maps = pl.DataFrame({"feature": [1, 1, 1], "rank": [2, 0, 1], "sample_id": ["c", "a", "b"]})
    contexts = pl.DataFrame({"feature": [2, 2], "rank": [0, 1], "sample_id": ["x", "y"]})
    top = pl.DataFrame({"feature": [2, 2], "rank": [0, 1], "sample_id": ["x", "y"], "modality": ["text", "text"],
                        "token_index": [7, 3]})
    got = shown_examples([(1, "image", 2, []), (2, "text", 2, [])], maps, contexts, top)
    assert got == {1: [{"sample_id": "a", "token_index": -1}, {"sample_id": "b", "token_index": -1}],
                   2: [{"sample_id": "x", "token_index": 7}, {"sample_id": "y", "token_index": 3}]}
