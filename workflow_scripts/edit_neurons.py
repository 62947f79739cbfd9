"""Entry point of rule edit_neurons: closed-form and optimised edits, measured and saved as deltas."""

from pathlib import Path

import pyarrow as pa
import torch

from mmsae.core.io import write_parquet
from mmsae.models import load_subject_model
from mmsae.neurons import edit_all, load_sample_image
from mmsae.neurons.find import caption
from mmsae.core.job import setup

sm = snakemake  # noqa: F821
log = setup(sm.log[0], sm.threads, getattr(sm.resources, "gpu", 0))
p, cfg = sm.params, sm.params.neurons
subject = load_subject_model(p.model, dtype=p.dtype, device=p.device)
cases = torch.load(sm.input.cases, weights_only=False)
inputs = {}  # rebuild each sample's inputs (prompt + caption) once; its noun cases share them
for c in cases:
    name = c["sample"]["name"]
    if name not in inputs:
        inputs[name] = caption(subject, load_sample_image(c["sample"]), c["sample"]["prompt"], cfg["prompt_prefix"],
                               cfg["max_new_tokens"]).inputs
    c["full"] = inputs[name]
out_dir = Path(sm.output[0]).parent
results = edit_all(subject, cases, cfg["edits"], cfg["locality_prompts"], cfg, out_dir)
write_parquet(sm.output[0], pa.Table.from_pylist(results) if results else pa.table({"name": pa.array([], pa.string())}))
for r in results:
    log.info("%s", r)
