"""Entry point of rule find_neurons: captions, nouns, neuron scores, top tokens, heatmaps, properties."""

from pathlib import Path

import pyarrow as pa
import torch

from mmsae.data import usable_samples
from mmsae.data.corpus import load_image
from mmsae.core.io import atomic_path, write_bytes, write_json, write_parquet
from mmsae.codes.maps import heatmap, masked, png_bytes, top_percent_mask
from mmsae.models import load_subject_model
from mmsae.neurons import find_all
from mmsae.core.job import setup

sm = snakemake  # noqa: F821
log = setup(sm.log[0], sm.threads, getattr(sm.resources, "gpu", 0))
p, cfg = sm.params, sm.params.neurons
# the corpus listing's usable images (never a fresh scan: it would meet the files extraction skips)
usable = usable_samples(sm.input.images, [cfg["prompt"]], cfg["text_prompts"], cfg["max_images"])
samples = [{"name": s.sample_id, "prompt": s.prompt, "image": s.image_path} for s in usable]
subject = load_subject_model(p.model, dtype=p.dtype, device=p.device)
res = find_all(subject, samples, cfg)
out = Path(sm.output.properties).parent
maps = []
for (case, layer, neuron), grid in res["grids"].items():
    sample = next(c["sample"] for c in res["cases"] if c["case"] == case)
    image = load_image(sample["image"])[0]
    stem = f"maps/{case.replace(':', '_')}-L{layer}-N{neuron}"
    write_bytes(out / f"{stem}.png", png_bytes(heatmap(image, grid.clip(min=0))))
    write_bytes(out / f"{stem}-top5.png", png_bytes(masked(image, top_percent_mask(grid, image.size, 5.0))))
    maps.append({"case": case, "layer": layer, "neuron": neuron, "png": f"{stem}.png", "mask_png": f"{stem}-top5.png"})
write_parquet(sm.output.captions, pa.Table.from_pylist(res["captions"]))
write_parquet(sm.output.neurons, pa.Table.from_pylist(res["neurons"]) if res["neurons"] else pa.table({"case": pa.array([], pa.string())}))
write_parquet(sm.output.tokens, pa.Table.from_pylist(res["tokens"]) if res["tokens"] else pa.table({"layer": pa.array([], pa.int64())}))
cases = [{k: v for k, v in c.items() if k != "full"} for c in res["cases"]]
with atomic_path(sm.output.cases, ".pt") as tmp:
    torch.save(cases, tmp)
write_json(sm.output.properties, {**res["properties"], "maps": maps, "n_samples": len(samples)})
log.info("%d captions, %d noun cases; properties %s", len(res["captions"]), len(cases), res["properties"])
