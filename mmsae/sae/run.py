"""Train an SAE from an activation manifest and write it in SAELens's layout, with metrics - in one
process, or as one rank of ``torchrun`` (DDP: each rank streams its own shards, gradients are averaged by
DistributedDataParallel, dead-latent statistics all-reduced, rank 0 evaluates and writes).

    torchrun --standalone --nproc_per_node=N -m mmsae.sae.run --manifest M --out DIR --ckpt DIR --opts JSON
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import torch

from mmsae.core.gpu import resolve_device
from mmsae.core.io import write_json, write_parquet
from mmsae.sae.data import ActivationStream, heldout_sample_ids
from mmsae.sae.distributed import rank_world
from mmsae.sae.io import save_sae, save_sparsity
from mmsae.sae.malloc import keep_freed_memory
from mmsae.sae.norms import fold_scaling_factor, norm_stats, row_norms, scaling_factor
from mmsae.sae.trainer import TrainConfig, evaluate, log_table, train
from mmsae.core.shards import shard_paths

log = logging.getLogger(__name__)
SAMPLES, HELDOUT = "samples.parquet", "heldout.json"


def train_from_manifest(manifest_path: str | os.PathLike, opts: dict, device: str, ckpt_dir: str | os.PathLike,
                        out_dir: str | os.PathLike, log_path: str | os.PathLike | None = None) -> dict | None:
    """Train on the manifest's shards; rank 0 writes ``cfg.json``, ``sae_weights.safetensors``,
    ``sparsity.safetensors``, ``metrics.json``, ``heldout.json`` (the held-out sample ids, a JSON list) and ``log.parquet`` (or
    ``log_path``) to ``out_dir`` and returns the metrics.

    The held-out split is by image and by text prompt (:func:`~mmsae.sae.data.heldout_sample_ids`),
    read from ``samples.parquet`` beside the manifest. Before training, one pass over the training
    tokens gives ``metrics["token_norms"]`` (:func:`~mmsae.sae.norms.norm_stats`), the outlier
    threshold ``sae.exclude_norm_above`` x the median norm, and the scale of
    ``sae.normalize_activations`` (:mod:`mmsae.sae.norms`); the scale is folded into the saved SAE.

    Raises:
        FileNotFoundError: no ``samples.parquet`` beside the manifest.
        ValueError: fewer shards than ranks, or a batch size not divisible by the number of ranks.
    """
    rank, world = rank_world()
    manifest = json.loads(Path(manifest_path).read_text())
    cfg = TrainConfig(**opts, device=device)
    paths = shard_paths(manifest_path)
    if world > 1 and (len(paths) < world or cfg.batch_size % world):
        raise ValueError(f"DDP over {world} ranks needs >= {world} shards (have {len(paths)}) and sae.batch_size "
                         f"divisible by {world} (is {cfg.batch_size})")
    exclude = manifest["special_token_ids"] if cfg.exclude_special_tokens else None
    samples_path = Path(manifest_path).parent / SAMPLES
    if not samples_path.is_file():
        raise FileNotFoundError(f"{samples_path} not found: the held-out split needs the samples table of {manifest_path}")
    held = heldout_sample_ids(pq.read_table(samples_path, columns=["sample_id", "image_path", "prompt"]), cfg.heldout_fraction)

    # One pass over the training tokens: their norm distribution, the outlier threshold, the scale.
    norms, norm_is_image = _stream(paths, cfg, cfg.batch_size, cfg.seed, held, exclude).train_norms()
    token_norms = norm_stats(norms, norm_is_image)
    max_norm = cfg.exclude_norm_above * token_norms["all"]["median"] if cfg.exclude_norm_above is not None else None
    kept = norms <= max_norm if max_norm is not None else slice(None)
    scale = scaling_factor(norms[kept], manifest["d_model"]) if cfg.normalize_activations == "expected_average_only_in" else 1.0
    mine = _stream(paths[rank::world], cfg, cfg.batch_size // world, cfg.seed + rank, held, exclude, max_norm, scale, world)
    sae, rows, fires = train(mine, manifest["d_model"], cfg, ckpt_dir, progress=rank == 0)
    if rank != 0:
        return None
    heldout = _stream(paths, cfg, cfg.batch_size, cfg.seed, held, exclude).heldout(cfg.heldout_max_tokens)
    found = NormPass(token_norms, max_norm, scale, int((norms > max_norm).sum()) if max_norm is not None else None)
    data = TrainedOn(manifest["d_model"], manifest["model"], manifest["hook_point"], held, {"source": "cache"})
    return finish_training(sae, rows, fires, cfg, opts, data, found, heldout, out_dir, log_path, world)


@dataclass(frozen=True)
class NormPass:
    """What the pass over the training tokens before training found (:mod:`mmsae.sae.norms`).

    Attributes:
        token_norms: :func:`~mmsae.sae.norms.norm_stats` per modality (median, p99, max).
        max_norm: the outlier threshold (``sae.exclude_norm_above`` x the median norm), None when off.
        scale: the ``sae.normalize_activations`` factor the inputs were multiplied by (1.0: none).
        n_excluded: training tokens above ``max_norm`` (None when off).
    """

    token_norms: dict
    max_norm: float | None = None
    scale: float = 1.0
    n_excluded: int | None = None


@dataclass(frozen=True)
class TrainedOn:
    """Where the SAE's training data came from, as ``cfg.json`` and ``metrics.json`` record it.

    Attributes:
        d_model: the hook point's width; model_name: the subject model; hook_point: where it was read.
        held: the held-out sample ids (``heldout.json``).
        extra: merged into the metrics (e.g. ``{"source": "cache"}``).
    """

    d_model: int
    model_name: str
    hook_point: str
    held: list[str]
    extra: dict = field(default_factory=dict)


def finish_training(sae, rows: list[dict], fire_counts: torch.Tensor, cfg: TrainConfig, opts: dict, data: TrainedOn, norms: NormPass,
                    heldout: tuple[torch.Tensor, torch.Tensor], out_dir: str | os.PathLike,
                    log_path: str | os.PathLike | None = None, world: int = 1) -> dict:
    """Fold the scale into the trained SAE, evaluate it on the held-out rows and write ``cfg.json``,
    ``sae_weights.safetensors``, ``sparsity.safetensors`` (log10 firing density of each latent over the
    training tokens, :func:`~mmsae.sae.io.save_sparsity`), ``metrics.json``, ``heldout.json`` and ``log.parquet`` (or ``log_path``);
    return the metrics. Shared by cached and online training (:mod:`mmsae.sae.online`).

    ``dead_tokens_seen`` gives the training tokens seen per modality and the window
    (``sae.dead_tokens``); a per-modality dead fraction is null, with ``dead_fraction_{kind}_null_reason``,
    while its modality has seen fewer tokens than the window.

    Args:
        rows: the training log (one dict per logged step); fire_counts: (d_sae,) the training tokens
            each latent fired on, out of ``rows[-1]["tokens"]`` (:func:`~mmsae.sae.trainer.train`); opts: the ``sae`` config section (stored in cfg.json).
        data: the model, hook point and held-out ids; norms: the pre-pass's findings.
        heldout: ``(x (n, d_model) float32 raw, is_image (n,) bool)``.
        world: DDP ranks that trained.
    """
    d_model, held, extra = data.d_model, data.held, data.extra
    token_norms, max_norm, scale, n_excluded = norms.token_norms, norms.max_norm, norms.scale, norms.n_excluded
    if scale != 1.0:
        fold_scaling_factor(sae, scale)  # the saved SAE takes raw activations, as SAELens saves it
    x, is_image = heldout
    metrics = {
        "d_model": d_model, "d_sae": cfg.d_sae, "k": cfg.k, "steps": cfg.steps, "batch_size": cfg.batch_size,
        "ranks": world, "tokens_trained": cfg.steps * cfg.batch_size, "train_seconds": round(rows[-1]["elapsed_s"], 2),
        "final_train_fvu": rows[-1]["fvu"], "n_heldout_samples": len(held), "heldout": _heldout_metrics(sae, x, is_image, max_norm),
        **{k: rows[-1][k] for k in ("dead_fraction", "dead_fraction_image", "dead_fraction_text")},
        "token_norms": token_norms,
        "normalize_activations": {"method": cfg.normalize_activations, "scaling_factor": scale},
        **extra,
    }
    last = rows[-1]
    metrics["dead_tokens_seen"] = {"all": last["tokens"], "image": last.get("tokens_seen_image"),
                                   "text": last.get("tokens_seen_text"), "window": cfg.dead_tokens}
    for kind in ("image", "text"):
        if metrics[f"dead_fraction_{kind}"] is None:
            metrics[f"dead_fraction_{kind}_null_reason"] = (
                f"training saw {last.get(f'tokens_seen_{kind}')} {kind} tokens, fewer than sae.dead_tokens "
                f"({cfg.dead_tokens}): no latent can have gone that long without firing on them")
    if max_norm is not None:
        metrics["exclude_norm_above"] = {"multiple_of_median": cfg.exclude_norm_above, "threshold": max_norm,
                                         "n_excluded_train_tokens": n_excluded}
    norm_cfg = {"method": cfg.normalize_activations, "scaling_factor": scale, "folded": True}
    save_sae(sae, out_dir, model_name=data.model_name, hook_point=data.hook_point,
             extra={"train": opts, "metrics": metrics, "normalize_activations": norm_cfg})
    save_sparsity(out_dir, fire_counts, last["tokens"])
    write_parquet(log_path or Path(out_dir) / "log.parquet", log_table(rows))
    write_json(Path(out_dir) / HELDOUT, held)
    write_json(Path(out_dir) / "metrics.json", metrics)
    return metrics


def _stream(paths, cfg: TrainConfig, batch_size, seed, held, exclude, max_norm=None, scale=1.0, world=1) -> ActivationStream:
    return ActivationStream(paths, batch_size=batch_size, seed=seed, buffer_tokens=cfg.buffer_tokens // world, heldout_ids=held,
                            exclude_token_ids=exclude, max_norm=max_norm, scale=scale)


def _heldout_metrics(sae, x, is_image, max_norm: float | None) -> dict:
    """:func:`evaluate` on the held-out tokens; with an outlier threshold, on the tokens at or below it
    (``fvu`` etc.), plus ``fvu_including_excluded`` over all of them and ``n_excluded_tokens``."""
    if max_norm is None or len(x) == 0:
        return evaluate(sae, x, is_image)
    keep = torch.from_numpy(row_norms(x.numpy()) <= max_norm)
    res = evaluate(sae, x[keep], is_image[keep])
    res["fvu_including_excluded"] = evaluate(sae, x, is_image)["fvu"]  # len(x) > 0 here
    res["n_excluded_tokens"] = int((~keep).sum())
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--opts", required=True, help="the sae section of the config, as JSON")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank%(process)d %(name)s %(message)s")
    keep_freed_memory()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(args.device)
    if world > 1:
        cuda = device != "cpu" and torch.cuda.is_available()
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        else:
            device = "cpu"
    try:
        train_from_manifest(args.manifest, json.loads(args.opts), device, args.ckpt, args.out)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
