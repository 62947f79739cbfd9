"""Entry point of rule score_explanations: detection and fuzzing scores of each explanation and of a
shuffled one on held-out examples (after EleutherAI delphi's scorers, on our endpoint client)."""

import json
from pathlib import Path

import polars as pl

from mmsae.evaluate.scoring import (all_cached, build_tasks, configured_scorer, explained_features, logprob_sampling,
                                    score_tasks, summarise)
from mmsae.evaluate.forced_choice import ForcedChoiceScorer, uses_forced_choice
from mmsae.evaluate.scoring_prompts import delphi_prompt_texts
from mmsae.evaluate.scoring_examples import collect_examples
from mmsae.explain import EndpointConfig, Explainer, endpoint_session
from mmsae.explain.cache import ResponseCache
from mmsae.codes.schema import scan_codes
from mmsae.core.io import write_json, write_parquet
from mmsae.core.shards import shard_paths
from mmsae.core.job import endpoint_runtime, setup

sm = snakemake  # noqa: F821
log = setup(sm.log[0], sm.threads, getattr(sm.resources, "gpu", 0))
i, p = sm.input, sm.params.scoring
explanations = pl.read_parquet(i.explanations)
if "shown_examples" not in explanations.columns:
    raise ValueError(f"{i.explanations}: no shown_examples column (written before held-out scoring); rerun explain_chunk")
explained = explained_features(explanations, p["include_untagged"], p["max_features"])
shown = {f: {e["sample_id"] for e in (ex or [])}
         for f, ex in zip(explanations["feature"].to_list(), explanations["shown_examples"].to_list())}
categories = {}
if "refined" in i.keys():
    refined = pl.read_parquet(i.refined)
    categories = {f: c for f, c in zip(refined["feature"].to_list(), refined["category"].to_list()) if c is not None}
manifest = json.loads(Path(i.codes).read_text())  # the interpretation corpus's grid side
examples = collect_examples(
    explained, shown=shown, contexts=pl.read_parquet(i.contexts), codes=scan_codes(shard_paths(i.codes)),
    samples=pl.read_parquet(i.samples, columns=["sample_id", "image_path", "tokens"]), seed=p["seed"],
    side=manifest.get("grid_side") or 1, n_quantiles=p["n_quantiles"], per_quantile=p["per_quantile"],
    threshold=p["fuzz_threshold"],
)
delphi = delphi_prompt_texts() if p["prompts"] == "delphi" else None  # fails here, naming the package, when absent
tasks = build_tasks(explained, examples, p["seed"], batch_size=p["n_examples"], mode=p["mode"], prompts=p["prompts"],
                    delphi=delphi)
log.info("%d explained features (%d text, %d image): %d scorer requests", len(explained),
         sum(m == "text" for _, m, _ in explained), sum(m == "image" for _, m, _ in explained),
         sum(t.messages is not None for t in tasks))
cache = ResponseCache(sm.params.cache)
scorer = None
endpoint = {**sm.params.endpoint, **endpoint_runtime(sm.config["explain"], sm.config["scoring"]["scorer"])}
if p["mode"] == "logprob":  # one-token answers with their top candidates (part of every request's cache key)
    endpoint = {**endpoint, "max_tokens": 1,
                "extra_body": {**(endpoint.get("extra_body") or {}), **logprob_sampling(p["top_logprobs"])}}
# the model name a local server would report (LocalServer: the resolved directory), to look the answers up
offline = EndpointConfig(
    base_url=endpoint.get("base_url") or "http://127.0.0.1:9/v1",
    model=str(Path(endpoint["local_model"]).resolve()) if endpoint["server"] == "local" else endpoint["model"],
    temperature=endpoint["temperature"], max_tokens=endpoint["max_tokens"], extra_body=endpoint.get("extra_body") or {})
forced = uses_forced_choice(endpoint, p["mode"])
has_requests = any(t.messages is not None for t in tasks)
if forced and has_requests:
    # transformers serve ignores logprobs: P("1") comes from the local model's own logits (model loaded
    # only for an uncached request)
    scorer = ForcedChoiceScorer.for_directory(endpoint["local_model"], cache)
    table = score_tasks(tasks, scorer, categories)
elif has_requests and all_cached(tasks, cache, offline):
    log.info("every answer is in the cache: no endpoint started")
    scorer = Explainer(offline, cache)
    table = score_tasks(tasks, scorer, categories)
elif has_requests:
    with endpoint_session(endpoint, server_log=sm.log[0] + ".server",
                          pid_dir=str(Path(sm.params.slots).parent / ".servers")) as cfg:
        scorer = Explainer(cfg, cache, slots_dir=sm.params.slots)
        table = score_tasks(tasks, scorer, categories)
else:
    table = score_tasks(tasks, None, categories)
cache.close()
summary = summarise(table, scorer_model=configured_scorer(endpoint))  # as configured, not this machine's path
if forced and scorer is not None:  # where P("1") came from, and how much mass the two answers keep
    summary["forced_choice"] = scorer.summary()
write_parquet(sm.output.scores, table)
write_json(sm.output.summary, summary)
log.info("sent %d requests; status %s; overall %s", scorer.sent if scorer else 0, summary["status"],
         [(g["method"], g["explanation_kind"], g["pooled_balanced_accuracy"], g["mean_balanced_accuracy"], g["pooled_auroc"])
          for g in summary["overall"]])
