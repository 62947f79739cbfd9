"""Entry point of rule export: a Neuronpedia import folder and a Hub-ready SAELens folder."""

import json
from pathlib import Path

import polars as pl
import torch

from mmsae.codes.schema import scan_codes
from mmsae.core.job import setup
from mmsae.core.shards import shard_paths
from mmsae.export import logits as lg
from mmsae.export import neuronpedia as npx
from mmsae.export.hub import upload_command, write_hub_folder
from mmsae.export.histograms import feature_histograms
from mmsae.export.run import README, build_records, feature_logit_tables
from mmsae.models import layer_index, load_subject_model
from mmsae.sae.io import load_sae

sm = snakemake  # noqa: F821
log = setup(sm.log[0], sm.threads, getattr(sm.resources, "gpu", 0))
i, p = sm.input, sm.params
ex = p.export
sae_dir = Path(i.metrics).parent
sae, sae_cfg = load_sae(sae_dir)
hook = sae_cfg.get("hook_name") or p.hook_point
repo_id = ex["hub_repo_id"]
model_name = Path(p.model).name if Path(p.model).exists() else p.model
corpus = p.corpus_train if isinstance(p.corpus_train, str) else json.dumps(p.corpus_train, sort_keys=True)

# Neuronpedia
selected = json.loads(Path(i.selected).read_text())["features"]
maps, contexts = pl.read_parquet(i.maps), pl.read_parquet(i.contexts)
shown = set(maps["feature"].to_list()) | set(contexts["feature"].to_list())
features = [int(f) for f in selected if f in shown]
codes = scan_codes(shard_paths(i.codes))
image_codes = codes.filter(pl.col("sample_id").is_in(maps["sample_id"].unique().to_list())
                           & (pl.col("modality") == "image")).collect()
subject = load_subject_model(p.model, dtype=p.dtype, device="cpu")  # float32 would be ~32 GB for the paper's 8B
norm = lg.final_norm(subject.model) if ex["logits_norm_weight"] else None
if ex["logits_norm_weight"] and norm is None:
    raise ValueError(f"export.logits_norm_weight: no final norm found in {type(subject.model).__name__}")
tok = subject.tokenizer
tables = feature_logit_tables(sae.W_dec.detach(), lg.unembedding(subject.model), None if norm is None else norm.weight.detach(),
                              features, decode=lambda t: tok.decode([t]), k=ex["top_logits"])
hists = feature_histograms(codes, features)
src = npx.SourceInfo(model_id=model_name.replace("/", "__"), source_set=ex["source_set"], layer=layer_index(hook) or 0,
                     hook_point=hook, release=ex["release"], description=f"mmsae TopK SAE at {hook}",
                     hf_repo_id=repo_id, hf_folder_id=hook, dataset=corpus)
feats, acts, expls, images = build_records(
    src, features=features, stats=pl.read_parquet(i.stats), contexts=contexts, maps=maps, maps_dir=Path(i.maps).parent,
    image_codes=image_codes, logit_tables=tables, histograms=hists,
    explanations=pl.read_parquet(i.explanations) if "explanations" in i.keys() else None,
    scoring=pl.read_parquet(i.scoring) if "scoring" in i.keys() else None)
rule_text = "with the final norm's weight" if norm is not None else "no final norm, as SAEDashboard's Neuronpedia runner"
base = npx.write_export(sm.output.neuronpedia, src, feats, acts, expls, images, README.format(logit_rule=rule_text, model_id=src.model_id, source_id=src.source_id))
log.info("neuronpedia export: %d features, %d examples, %d explanations in %s", len(feats), len(acts), len(expls), base)

# Hub
metrics = json.loads(Path(i.metrics).read_text())
lr = json.loads(Path(i.loss_recovered).read_text()) if "loss_recovered" in i.keys() else None
write_hub_folder(sm.output.hub, sae_dir=sae_dir, hook_point=hook, release=ex["release"], repo_id=repo_id,
                 model=p.model, metrics=metrics, loss_recovered=lr, corpus=corpus)
log.info("hub folder ready (nothing uploaded); to upload: %s", upload_command(repo_id, sm.output.hub))
