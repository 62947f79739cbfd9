"""Entry point of rule attribute: feature attribution per case (attribution.method), heatmaps, validation of both
methods by zero-ablation."""

from pathlib import Path

import pyarrow as pa
from PIL import Image

from mmsae.interventions.loading import load_model_with_sae
from mmsae.interventions.attribution_case import run_case
from mmsae.data.corpus import load_image, resolve_image_ref
from mmsae.core.io import write_bytes, write_json, write_parquet
from mmsae.codes.maps import heatmap, png_bytes
from mmsae.sae import trained_without_special_tokens
from mmsae.core.job import setup
from mmsae.core.progress import track

sm = snakemake  # noqa: F821
log = setup(sm.log[0], sm.threads, getattr(sm.resources, "gpu", 0))
p, cfg = sm.params, sm.params.attribution
m = load_model_with_sae(p.model, p.dtype, p.device, sm.input.cfg, p.hook_point)  # the hook point travels with the SAE
subject, sae, sae_cfg, hook_point, module = m.subject, m.sae, m.sae_cfg, m.hook_point, m.module
out_dir = Path(sm.output.summary).parent
# special tokens stay undecomposed when the SAE was trained without them (an SAE from elsewhere is spliced everywhere)
keep_special = trained_without_special_tokens(sae_cfg)
all_rows, summaries = [], []
for case in track(cfg["cases"], "attribute", unit="cases"):
    case = {**case, "image": resolve_image_ref(case.get("image"))}
    rows, summary, grids = run_case(subject, module, sae, case, cfg["top_k"], cfg["validate_top"], cfg["pool"], cfg["method"],
                                   keep_special)
    image = load_image(case["image"])[0] if case["image"] else None
    summary["maps"] = []
    for (f, view), grid in sorted(grids.items()):
        # the base view covers the whole (squashed) image; tiles are shown as their grids
        canvas = image if view == 0 else Image.new("RGB", (grid.shape[1] * 16, grid.shape[0] * 16), (128, 128, 128))
        vmax = float(abs(grid).max()) or 1.0
        rel = f"maps/{case['name']}-f{f}-v{view}.png"
        write_bytes(out_dir / rel, png_bytes(heatmap(canvas, grid.clip(min=0), vmax=vmax)))
        summary["maps"].append({"feature": f, "view": view, "png": rel, "sum": float(grid.sum())})
    all_rows += rows
    summaries.append(summary)
    v = summary["validation"]
    log.info("case %s (%s): m=%.3f, %d active features; vs zero-ablation of %d features: ours r=%s sign=%s, "
             "reference r=%s sign=%s; %.2fs (ablation %.2fs/feature, reference %.2fs/feature)", case["name"], cfg["method"],
             summary["metric"], summary["n_active_features"], v["ours"]["n_features"], v["ours"]["pearson_r"],
             v["ours"]["sign_agreement"], v["reference"]["pearson_r"], v["reference"]["sign_agreement"],
             summary["seconds"]["attribution"], summary["seconds"]["ablation_per_feature"], summary["seconds"]["reference_per_feature"])
schema = pa.schema([("case", pa.string()), ("position", pa.int32()), ("token", pa.string()), ("modality", pa.string()),
                    ("view", pa.int16()), ("patch_row", pa.int16()), ("patch_col", pa.int16()), ("feature", pa.int32()),
                    ("attribution", pa.float32())])
write_parquet(sm.output.table, pa.Table.from_pylist(all_rows, schema=schema))
write_json(sm.output.summary, {"cases": summaries})
