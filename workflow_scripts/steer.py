"""Entry point of rule steer: text before/after clamping features, over a sweep of values, judged
(perplexity under the unsteered model, toward the feature, success)."""

import json
from pathlib import Path

import polars as pl
import pyarrow as pa

from mmsae.interventions.loading import load_model_with_sae
from mmsae.data.corpus import resolve_image_ref
from mmsae.core.io import write_parquet
from mmsae.sae import trained_without_special_tokens
from mmsae.interventions.steer import SweepConfig, features_matching, steering_sweep
from mmsae.interventions.verdict import feature_words, token_level_features
from mmsae.codes.schema import TEXT_DOMINANT
from mmsae.core.job import setup

sm = snakemake  # noqa: F821
log = setup(sm.log[0], sm.threads, getattr(sm.resources, "gpu", 0))
p, st = sm.params, sm.params.steer
stats = pl.read_parquet(sm.input.stats)
expl = pl.read_parquet(sm.input.explanations) if "explanations" in sm.input.keys() else None
contexts = pl.read_parquet(sm.input.contexts)
selected = json.loads(Path(sm.input.selected).read_text())["features"]
if st["features"]:
    features = list(st["features"])
elif st["match"]:
    features = features_matching(expl, st["match"])
    log.info("features whose explanation matches %s: %s", st["match"], features)
else:
    text_dom = set(stats.filter(TEXT_DOMINANT)["feature"])
    candidates = [f for f in selected if f in text_dom]
    picked = token_level_features(contexts, candidates, st["auto"]) if st["auto_pick"] == "token_level" else []
    log.info("token-level text features (top contexts peak on one content word): %s",
             ", ".join(f"{f} ({w!r}, {share:.0%})" for f, w, share in picked) or "none")
    features = [f for f, _w, _s in picked] or candidates[: st["auto"]]
    if not picked:
        log.info("steering the first %d text-dominant selected features instead: %s", st["auto"], features)
m = load_model_with_sae(p.model, p.dtype, p.device, sm.input.cfg, p.hook_point)  # the hook point travels with the SAE
subject, sae, sae_cfg, hook_point, module = m.subject, m.sae, m.sae_cfg, m.hook_point, m.module
prompts = [{"prompt": q["prompt"], "image": resolve_image_ref(q.get("image"))} for q in st["prompts"]]
sweep = SweepConfig.from_config(st, keep_special=trained_without_special_tokens(sae_cfg))  # special tokens the SAE never saw: unsteered
rows = steering_sweep(subject, module, sae, features, prompts, sweep,
                      dict(zip(stats["feature"], stats["max_activation"])),
                      {f: feature_words(f, contexts, expl) for f in {*features, *selected}})  # selected: the controls
schema = pa.schema([("feature", pa.int32()), ("prompt", pa.string()), ("image", pa.string()), ("scale", pa.string()),
                    ("value", pa.float64()), ("clamp_value", pa.float64()), ("positions", pa.string()), ("mode", pa.string()),
                    ("baseline", pa.string()),  # unsteered, or reconstruction (reference mode): what text_before is
                    ("text_before", pa.string()), ("text_after", pa.string()), ("changed", pa.bool_()),
                    ("ppl_before", pa.float64()), ("ppl_after", pa.float64()), ("feature_words", pa.list_(pa.string())),
                    ("toward_words", pa.list_(pa.string())), ("toward_feature", pa.bool_()), ("success", pa.bool_()),
                    ("control_features", pa.list_(pa.int32())), ("control_toward", pa.float64()),
                    ("control_success", pa.float64()), ("special_tokens_steered", pa.bool_())])
write_parquet(sm.output[0], pa.Table.from_pylist(rows, schema=schema))
log.info("steered %d features x %d prompts x %d values; of %d generations %d changed, %d toward the feature, "
         "%d fluent (ppl ratio <= %g), %d successes; judged by the other selected features' words instead (the control): "
         "%.2f toward, %.2f successes expected", len(features), len(prompts), len(st["values"]), len(rows),
         sum(r["changed"] for r in rows), sum(bool(r["toward_feature"]) for r in rows),
         sum(r["ppl_after"] <= st["success_max_ppl_ratio"] * r["ppl_before"] for r in rows), st["success_max_ppl_ratio"],
         sum(r["success"] for r in rows), sum(r["control_toward"] or 0 for r in rows), sum(r["control_success"] or 0 for r in rows))
