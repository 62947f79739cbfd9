def train_sae_inputs(wildcards):
    """sae.source cache: the activation manifest and samples table (the held-out split groups samples by
    image, read beside the manifest); online: the model (the demo's directory, nothing for a hub id)."""
    if config["sae"]["source"] == "online":
        return {"model": model_input(wildcards)}
    return {"activations": ACTIVATIONS, "samples": SAMPLES}


def train_sae_online_params():
    """Online, what the activations depend on (extraction's keys); nothing when training reads the cache."""
    if config["sae"]["source"] != "online":
        return {}
    return {
        "model": model_path(),
        "dtype": config["model"]["dtype"],
        "hook_point": config["model"]["hook_point"],
        "corpus": corpus_params("prompts", "text_prompts", "max_images"),
        "extract": {k: v for k, v in config["extract"].items() if k in ("batch_size", "max_image_pixels") or k.startswith("token_")},
    }


rule train_sae:
    """Train a TopK SAE on the activation shards (sae.source cache) or on the model's forward passes
    (online); save it in SAELens's layout."""
    input:
        unpack(train_sae_inputs),
    output:
        cfg=f"{SAE_DIR}/cfg.json",
        weights=f"{SAE_DIR}/sae_weights.safetensors",
        metrics=report(f"{SAE_DIR}/metrics.json", caption="../report/sae_metrics.rst", category="SAE"),
        heldout=f"{SAE_DIR}/heldout.json",
        log_table=report(f"{SAE_DIR}/log.parquet", caption="../report/training_curve.rst", category="SAE"),
    params:
        sae={k: v for k, v in config["sae"].items() if k not in ("name", "gpus", "checkpoint_every")},
        device=config["model"]["device"],
        checkpoint_dir=f"{SAE_DIR}/checkpoints",
        online=train_sae_online_params(),
        code=code("train_sae.py"),
    log:
        "results/logs/train_sae.log",
    benchmark:
        "results/benchmarks/train_sae.tsv"
    threads: workflow.cores
    resources:
        gpu=config["sae"]["gpus"],
    conda:
        "../envs/sae.yaml"
    script:
        "../workflow_scripts/train_sae.py"


rule encode:
    """Encode one part's activation shards into sparse codes (the k nonzero latents per token)."""
    input:
        activations="results/activations/part-{part}/manifest.json",
        cfg=f"{SAE_DIR}/cfg.json",
        weights=f"{SAE_DIR}/sae_weights.safetensors",
    output:
        directory("results/codes/part-{part}"),
    params:
        device=config["model"]["device"],
        code=code("encode.py"),
    wildcard_constraints:
        part=r"\d+",
    log:
        "results/logs/encode-{part}.log",
    benchmark:
        "results/benchmarks/encode-{part}.tsv"
    threads: workflow.cores
    resources:
        gpu=1,
    conda:
        "../envs/sae.yaml"
    script:
        "../workflow_scripts/encode.py"


rule merge_codes:
    """One manifest over the code parts."""
    input:
        expand("results/codes/part-{part}", part=PARTS),
    output:
        manifest=CODES,
    params:
        code=code("merge_manifests.py"),
    log:
        "results/logs/merge_codes.log",
    threads: 1
    resources:
        gpu=0,
    conda:
        "../envs/features.yaml"
    script:
        "../workflow_scripts/merge_manifests.py"
