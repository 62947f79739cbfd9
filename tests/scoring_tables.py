"""A synthetic scoring corpus shared by the scoring tests (not a test module): feature f fires on the
word WORDS[f] and nowhere else; the scorer requests built from it; an oracle scorer that is right when
the explanation is; an Explainer client on a local endpoint."""

import json
import re
from pathlib import Path

import numpy as np
import polars as pl

from mmsae.evaluate.scoring import build_tasks, explained_features
from mmsae.evaluate.scoring_examples import collect_examples
from mmsae.explain import EndpointConfig, Explainer
from mmsae.explain.cache import ResponseCache

WORDS = {0: " apple", 1: " river", 2: " candle", 3: " tiger"}
FILLER = [" the", " a", " of", " and", " to", " in", " is", " it", " on", " was", " for", " as", " at", " by"]


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
    shown = {f: [{"sample_id": c["sample_id"], "token_index": 0} for c in contexts if c["feature"] == f and c["rank"] >= n_per_word - 2]
             for f in WORDS}  # the explainer saw each word's two highest-activating samples
    expl = [{"feature": f, "kind": "text", "status": "ok", "explanation": f"the word{w}", "shown_examples": shown[f]}
            for f, w in WORDS.items()]
    pl.DataFrame(expl).write_parquet(root / "explanations.parquet")


def load_tasks(root: Path, n_examples: int = 6, seed: int = 0, mode: str = "batch"):
    """The scorer requests for the synthetic tables (what the rule's script does before sending)."""
    from mmsae.codes.schema import scan_codes
    from mmsae.core.shards import shard_paths
    explained = explained_features(pl.read_parquet(root / "explanations.parquet"), True, None)
    expl = pl.read_parquet(root / "explanations.parquet")
    shown = {f: {e["sample_id"] for e in ex} for f, ex in zip(expl["feature"].to_list(), expl["shown_examples"].to_list())}
    ex = collect_examples(explained, shown=shown, contexts=pl.read_parquet(root / "contexts.parquet"),
                          codes=scan_codes(shard_paths(root / "codes" / "manifest.json")),
                          samples=pl.read_parquet(root / "samples.parquet"), seed=seed, side=1)
    return build_tasks(explained, ex, seed, batch_size=n_examples, mode=mode)


def oracle(body: dict) -> str:
    """A scorer that is right when the explanation is: 'the word X' -> 1 for an example containing X
    (detection), or whose every marked span contains X (fuzzing)."""
    prompt = body["messages"][-1]["content"]
    word = re.search(r"Feature description: the word (\S+)", prompt).group(1)
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
