rule train_sae:
    """Train a TopK SAE on the activation shards; save it in SAELens's layout."""
    input:
        activations=ACTIVATIONS,
    output:
        cfg=f"{SAE_DIR}/cfg.json",
        weights=f"{SAE_DIR}/sae_weights.safetensors",
        metrics=f"{SAE_DIR}/metrics.json",
        heldout=f"{SAE_DIR}/heldout.json",
        log_table=f"{SAE_DIR}/log.parquet",
    params:
        sae={k: v for k, v in config["sae"].items() if k != "gpus"},
        device=config["model"]["device"],
        checkpoint_dir=f"{SAE_DIR}/checkpoints",
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
        manifest="results/codes/part-{part}/manifest.json",
    params:
        device=config["model"]["device"],
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
        expand("results/codes/part-{part}/manifest.json", part=PARTS),
    output:
        CODES,
    log:
        "results/logs/merge_codes.log",
    threads: 1
    resources:
        gpu=0,
    conda:
        "../envs/features.yaml"
    script:
        "../workflow_scripts/merge_manifests.py"
