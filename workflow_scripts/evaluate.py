"""Entry point of rule evaluate: IoU and CLIP score of refined explanations, random baseline, Table 1."""

import json
import os
from pathlib import Path

import polars as pl

# Models come from the local Hugging Face cache; set HF_HUB_OFFLINE=0 to allow downloads.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mmsae.core.shards import shard_paths  # noqa: E402
from mmsae.evaluate.run import Table1Config, score_features, summary_table  # noqa: E402
from mmsae.evaluate.backends import ClipScorer, GroundedSegmenter, try_load  # noqa: E402
from mmsae.evaluate.refine import CATEGORIES  # noqa: E402
from mmsae.codes.schema import scan_codes, write_table  # noqa: E402
from mmsae.core.io import atomic_path, write_json  # noqa: E402
from mmsae.models import resolve_device  # noqa: E402
from mmsae.core.job import setup  # noqa: E402

sm = snakemake  # noqa: F821
log = setup(sm.log[0], sm.threads, getattr(sm.resources, "gpu", 0))
ev, device = sm.params.evaluate, resolve_device(sm.params.device)
manifest = json.loads(Path(sm.input.codes).read_text())  # the interpretation corpus's grid side
samples = pl.read_parquet(sm.input.samples).filter(pl.col("image_path").is_not_null())
images = dict(zip(samples["sample_id"], samples["image_path"]))
pool = samples.unique("image_path", keep="first", maintain_order=True)["sample_id"].to_list()
unavailable = {}
segmenter, why = try_load(lambda: GroundedSegmenter.from_pretrained(ev["detector"], ev["segmenter"], box_threshold=ev["box_threshold"],
                                                                    text_threshold=ev["text_threshold"], device=device,
                                                                    sam_masks=ev["sam_masks"]),
                          f"{ev['detector']} + {ev['segmenter']}")
if why:
    unavailable["iou"] = why
clip, why = try_load(lambda: ClipScorer.from_pretrained(ev["clip"], ev["clip_backend"]), ev["clip"])
if why:
    unavailable["clip_score"] = why
refined = pl.read_parquet(sm.input.refined)
scores = score_features(refined, pl.read_parquet(sm.input.top), images, scan_codes(shard_paths(sm.input.codes)),
                        manifest.get("grid_side") or 1, Table1Config.from_config(ev), segmenter, clip, pool)
rows, md = summary_table(scores, list(CATEGORIES), unavailable, ev["n_boot"], ev["seed"])
write_table(sm.output.scores, scores)
with atomic_path(sm.output.table, ".md") as tmp:
    tmp.write_text(md)
n_phrase = refined.filter(pl.col("phrase").is_not_null()).height
write_json(sm.output.summary, {"table": rows, "unavailable": unavailable, "n_refined": refined.height,
                               "n_with_phrase": n_phrase, "n_excluded_without_phrase": refined.height - n_phrase,
                               "markdown": md})
log.info("Table 1:\n%s", md)
