"""Entry point of rule train_sae: train the TopK SAE, save it in SAELens's layout with metrics."""

import json
import time

from mmsae.shards import shard_paths
from mmsae.io import write_json, write_parquet
from mmsae.gpu import resolve_device
from mmsae.sae import save_sae
from mmsae.sae.data import ActivationStream
from mmsae.sae.trainer import TrainConfig, evaluate, log_table, train
from mmsae.workflow import setup

sm = snakemake  # noqa: F821
log = setup(sm.log[0], sm.threads, getattr(sm.resources, "gpu", 0))
manifest = json.loads(open(sm.input.activations).read())
opts = {k: v for k, v in sm.params.sae.items() if k != "name"}
cfg = TrainConfig(**opts, device=resolve_device(sm.params.device))
stream = ActivationStream(
    shard_paths(sm.input.activations),
    batch_size=cfg.batch_size,
    seed=cfg.seed,
    buffer_tokens=cfg.buffer_tokens,
    heldout_fraction=cfg.heldout_fraction,
    exclude_token_ids=manifest["special_token_ids"] if cfg.exclude_special_tokens else None,
)
t0 = time.time()
sae, rows = train(stream, manifest["d_model"], cfg, sm.params.checkpoint_dir)
x, is_image = stream.heldout(cfg.heldout_max_tokens)
heldout = evaluate(sae, x, is_image)
metrics = {
    "d_model": manifest["d_model"], "d_sae": cfg.d_sae, "k": cfg.k, "steps": cfg.steps, "batch_size": cfg.batch_size,
    "tokens_trained": cfg.steps * cfg.batch_size, "train_seconds": round(time.time() - t0, 2),
    "final_train_fvu": rows[-1]["fvu"], "heldout": heldout,
    **{k: rows[-1][k] for k in ("dead_fraction", "dead_fraction_image", "dead_fraction_text")},
}
out_dir = sm.output.cfg.rsplit("/", 1)[0]
save_sae(sae, out_dir, model_name=manifest["model"], hook_name=manifest["hook_point"], extra={"train": opts, "metrics": metrics})
write_parquet(sm.output.log_table, log_table(rows))
write_json(sm.output.metrics, metrics)
log.info("held-out FVU %.4f, L0 %.1f, never-active %.3f; dead fraction (train) %.3f",
         heldout.get("fvu", float("nan")), heldout.get("l0", float("nan")), heldout.get("never_active_fraction", float("nan")), metrics["dead_fraction"])
