"""SAE training under torchrun with DDP (gloo, 2 CPU processes) matches single-process training."""

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch

from mmsae.core.io import write_parquet
from mmsae.sae import load_sae
from mmsae.sae.run import train_from_manifest
from mmsae.core.shards import activation_schema, shard_paths

OPTS = {"d_sae": 128, "k": 8, "steps": 80, "batch_size": 128, "warmup_steps": 5, "buffer_tokens": 512,
        "b_dec_init_tokens": 256, "checkpoint_every": 40, "dead_tokens": 5000, "heldout_fraction": 0.2}


def _manifest(tmp_path, n_shards=4, n=600, d=32):
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(64, d)).astype(np.float32)
    shards = []
    for s in range(n_shards):
        codes = (rng.random((n, 64)) < 0.08) * rng.random((n, 64)) * 3
        x = (codes @ basis + 0.05 * rng.normal(size=(n, d))).astype(np.float32)
        table = pa.table({
            "sample_id": [f"s{s}-{i // 20}" for i in range(n)], "token_index": (np.arange(n) % 20).astype(np.int32),
            "token_id": np.full(n, 7, np.int32),
            "modality": pa.array(["image" if i % 2 else "text" for i in range(n)]).dictionary_encode().cast(pa.dictionary(pa.int8(), pa.string())),
            "view": np.zeros(n, np.int16), "patch_row": np.zeros(n, np.int16), "patch_col": np.zeros(n, np.int16),
            "activation": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d)}, schema=activation_schema(d))
        write_parquet(tmp_path / f"shard-{s:05d}.parquet", table)
        shards.append({"path": f"shard-{s:05d}.parquet", "n_tokens": n})
    # each image under two prompts, every 5th sample text-only
    ids = [f"s{s}-{j}" for s in range(n_shards) for j in range(n // 20)]
    images = [None if i % 5 == 4 else f"img{i // 2}.png" for i in range(len(ids))]
    write_parquet(tmp_path / "samples.parquet", pa.table({"sample_id": ids, "image_path": images,
                                                          "prompt": [f"prompt {i % 2}" for i in range(len(ids))]}))
    manifest = {"shards": shards, "d_model": d, "special_token_ids": [0], "model": "synthetic", "hook_point": "h"}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path / "manifest.json"


@pytest.mark.slow
def test_ddp_two_ranks_matches_single_process(tmp_path):
    manifest = _manifest(tmp_path)
    single = train_from_manifest(manifest, OPTS, "cpu", tmp_path / "ck1", tmp_path / "single")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mmsae.sae.run",
           "--manifest", str(manifest), "--out", str(tmp_path / "ddp"), "--ckpt", str(tmp_path / "ck2"),
           "--opts", json.dumps(OPTS), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert ddp["ranks"] == 2 and ddp["tokens_trained"] == single["tokens_trained"]
    assert single["heldout"]["fvu"] < 0.5 and ddp["heldout"]["fvu"] < 0.5  # both learned
    assert abs(ddp["heldout"]["fvu"] - single["heldout"]["fvu"]) < 0.05
    sae, cfg = load_sae(tmp_path / "ddp")
    assert cfg["d_sae"] == 128 and not (tmp_path / "ck2" / "checkpoint.pt").exists()
    assert (tmp_path / "ddp" / "sparsity.safetensors").is_file()


def _rank_worker(rank, world, init_file, paths, out_dir):
    import torch.distributed as dist

    from mmsae.sae.data import ActivationStream
    from mmsae.sae.trainer import TrainConfig, train

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        stream = ActivationStream(paths[rank::world], batch_size=64, seed=rank, buffer_tokens=256, heldout_ids=())
        cfg = TrainConfig(d_sae=128, k=4, steps=30, batch_size=128, warmup_steps=3, dead_tokens=300, b_dec_init_tokens=128,
                          checkpoint_every=1000)
        sae, rows, fires = train(stream, 32, cfg, f"{out_dir}/ck{rank}", progress=False)
        torch.save({"sae": sae.state_dict(), "rows": rows, "fires": fires}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_stay_identical_with_auxk(tmp_path):
    """Under DDP each rank sees other data, yet after training every rank holds the same SAE (rank 0's
    initial parameters broadcast, main and AuxK gradients averaged), decoder rows are unit-norm, and the
    dead-latent counters agree (all-reduced token counts and firing masks)."""
    manifest = _manifest(tmp_path)
    paths = [str(p) for p in shard_paths(manifest)]
    torch.multiprocessing.spawn(_rank_worker, args=(2, str(tmp_path / "init"), paths, str(tmp_path)), nprocs=2)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    for name, p in a["sae"].items():
        assert torch.equal(p, b["sae"][name]), name
    torch.testing.assert_close(a["sae"]["W_dec"].norm(dim=1), torch.ones(128))
    dead = [r["dead_fraction"] for r in a["rows"]]
    assert max(dead) > 0 and any(r["aux_loss"] > 0 for r in a["rows"])  # AuxK was in play
    assert dead == [r["dead_fraction"] for r in b["rows"]]
    assert [r["fvu"] for r in a["rows"]] == [r["fvu"] for r in b["rows"]]  # logged means over ranks
    # fire counts summed over ranks: equal on both, and their total is the global L0 x the global batch per step
    assert torch.equal(a["fires"], b["fires"])
    assert int(a["fires"].sum()) == pytest.approx(sum(r["l0"] * 128 for r in a["rows"]), rel=1e-6)
