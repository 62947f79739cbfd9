"""Entry point of rule train_sae: train the TopK SAE on the activation shards (under torchrun with DDP
when the rule gets more than one GPU) or, with sae.source online, on the model's forward passes over the
training corpus; save it in SAELens's layout with metrics."""

import json
import subprocess
import sys

from mmsae.data import build_corpus
from mmsae.core.gpu import resolve_device
from mmsae.models import load_subject_model
from mmsae.sae.malloc import keep_freed_memory
from mmsae.sae.online import ModelSource, token_fractions, train_online
from mmsae.sae.run import train_from_manifest
from mmsae.core.job import setup

sm = snakemake  # noqa: F821
gpus = int(getattr(sm.resources, "gpu", 0))
log = setup(sm.log[0], sm.threads, gpus)
keep_freed_memory()  # the CPU step reuses its large blocks instead of faulting fresh pages in each step
opts = {**sm.params.sae, "checkpoint_every": sm.config["sae"]["checkpoint_every"]}  # how often to save is not a result
source = opts.pop("source")
out_dir = sm.output.cfg.rsplit("/", 1)[0]
if source == "online":
    if gpus > 1:
        raise ValueError(f"sae.source online trains in one process: set sae.gpus to 1 (is {gpus})")
    p = sm.params.online
    ex = p["extract"]
    subject = load_subject_model(p["model"], dtype=p["dtype"], device=sm.params.device)
    model_source = ModelSource(subject, build_corpus(p["corpus"]), p["hook_point"], ex["batch_size"], ex["max_image_pixels"],
                               token_fractions(ex["token_fraction"]), ex.get("seed", 0), identity=p)  # no seed: nothing subsampled
    metrics = train_online(model_source, opts, resolve_device(sm.params.device), sm.params.checkpoint_dir, out_dir,
                           log_path=sm.output.log_table)
elif gpus > 1:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", "-m", "mmsae.sae.run",
           "--manifest", sm.input.activations, "--out", out_dir, "--ckpt", sm.params.checkpoint_dir,
           "--opts", json.dumps(opts), "--device", sm.params.device]
    log.info("DDP over %d GPUs: %s", gpus, " ".join(cmd))
    subprocess.run(cmd, check=True)
    metrics = json.loads(open(sm.output.metrics).read())
else:
    metrics = train_from_manifest(sm.input.activations, opts, resolve_device(sm.params.device), sm.params.checkpoint_dir,
                                  out_dir, log_path=sm.output.log_table)
ho = metrics["heldout"]
log.info("held-out FVU %.4f, L0 %.1f, never-active %.3f; dead fraction (train) %.3f",
         ho.get("fvu", float("nan")), ho.get("l0", float("nan")), ho.get("never_active_fraction", float("nan")), metrics["dead_fraction"])
tn = metrics["token_norms"]
log.info("token norms (training tokens) median/p99/max: image %s, text %s", *(
    "/".join(f"{v:.1f}" if v is not None else "-" for v in (tn[m]["median"], tn[m]["p99"], tn[m]["max"])) for m in ("image", "text")))
if "fvu_including_excluded" in ho:
    log.info("held-out FVU %.4f without %d tokens above the norm cap, %.4f with them", ho["fvu"], ho["n_excluded_tokens"],
             ho["fvu_including_excluded"])
