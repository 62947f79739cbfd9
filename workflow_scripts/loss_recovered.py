"""Entry point of rule loss_recovered: next-token loss on the SAE's held-out samples with the SAE spliced in."""

import json
from pathlib import Path

from mmsae.interventions.loading import load_model_with_sae
from mmsae.data import build_corpus
from mmsae.core.io import write_json
from mmsae.interventions.loss_recovered import loss_recovered
from mmsae.sae import trained_without_special_tokens
from mmsae.core.job import setup

sm = snakemake  # noqa: F821
log = setup(sm.log[0], sm.threads, getattr(sm.resources, "gpu", 0))
p = sm.params
m = load_model_with_sae(p.model, p.dtype, p.device, sm.input.cfg, p.hook_point)  # the hook point travels with the SAE
subject, sae, sae_cfg, hook_point, module = m.subject, m.sae, m.sae_cfg, m.hook_point, m.module
# special tokens stay unspliced when the SAE was trained without them (an SAE from elsewhere is spliced everywhere)
keep_special = trained_without_special_tokens(sae_cfg)
heldout = json.loads(Path(sm.input.heldout).read_text())
out = loss_recovered(subject, sae, build_corpus(p.corpus), heldout, hook_point, keep_special,
                     p.loss_recovered["max_samples"], p.max_image_pixels)
write_json(sm.output[0], out)
for part in ("text", "answer", "all_positions"):
    r = out[part]
    if r is None:
        log.info("%s: none (%s)", part, out[f"{part}_null_reason"])
    else:
        log.info("%s: %d tokens, CE clean %.4g, SAE %.4g, zero %.4g, mean %.4g; loss recovered %s (mean-ablation %s); KL %.4g",
                 part, r["n_tokens"], r["ce_clean"], r["ce_sae"], r["ce_zero"], r["ce_mean"], r["ce_loss_recovered"],
                 r["ce_loss_recovered_mean"], r["kl_div"])
