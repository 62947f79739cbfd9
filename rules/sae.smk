rule train_sae:
    """Train a TopK SAE on the activation shards (sae.source cache) or on the model's forward passes
    (online); save it in SAELens's layout."""
    input:
        unpack(train_sae_inputs),
    output:
        cfg=f"{SAE_DIR}/cfg.json",
        weights=f"{SAE_DIR}/sae_weights.safetensors",
        sparsity=f"{SAE_DIR}/sparsity.safetensors",
        metrics=report(f"{SAE_DIR}/metrics.json", caption="../report/sae_metrics.rst", category="SAE"),
        heldout=f"{SAE_DIR}/heldout.json",
        log_table=report(f"{SAE_DIR}/log.parquet", caption="../report/training_curve.rst", category="SAE"),
    params:
        sae=sae_settings(config),  # mmsae.workflow.run_name: the same settings name the run folder
        device=config["model"]["device"],
        checkpoint_dir=f"{SAE_DIR}/checkpoints",
        online=train_sae_online_params(),
        script=script_hash_of("train_sae.py"),
    log:
        run_log("train_sae"),
    benchmark:
        run_benchmark("train_sae")
    threads: workflow.cores
    resources:
        gpu=config["sae"]["gpus"],
    conda:
        "../envs/sae.yaml"
    script:
        "../workflow_scripts/train_sae.py"


rule encode:
    """Run the model with the SAE at the hook point over one part of corpus.interpret; store only the
    sparse codes (the k nonzero latents per token), the part's samples and a manifest."""
    input:
        model=model_input,
        cfg=f"{SAE_DIR}/cfg.json",
        weights=f"{SAE_DIR}/sae_weights.safetensors",
    output:
        directory(f"{CODES_DIR}/part-{{part}}"),
    params:
        model=model_path(),
        dtype=config["model"]["dtype"],
        device=config["model"]["device"],
        hook_point=config["model"]["hook_point"],
        corpus=corpus_params("interpret", "prompts", "text_prompts", "max_images", "text_source"),
        encode=keys("encode", "batch_size", "shard_tokens", "base_view_only"),
        max_image_pixels=config["extract"]["max_image_pixels"],
        parts=config["extract"]["parts"],
        script=script_hash_of("encode.py"),
    wildcard_constraints:
        part=r"\d+",
    log:
        f"{RUN}/logs/encode-{{part}}.log",
    benchmark:
        f"{RUN}/benchmarks/encode-{{part}}.tsv"
    threads: workflow.cores
    resources:
        gpu=1,
    conda:
        "../envs/model.yaml"
    script:
        "../workflow_scripts/encode.py"


rule merge_codes:
    """One manifest and one samples table over the code parts (the interpretation corpus)."""
    input:
        expand(f"{CODES_DIR}/part-{{part}}", part=PARTS),
    output:
        manifest=CODES,
        samples=CODE_SAMPLES,
    params:
        script=script_hash_of("merge_manifests.py"),
    log:
        run_log("merge_codes"),
    threads: 1
    resources:
        gpu=0,
    conda:
        "../envs/features.yaml"
    script:
        "../workflow_scripts/merge_manifests.py"


rule loss_recovered:
    """Next-token loss on held-out samples with the SAE spliced in, against the clean, zero- and mean-ablated model."""
    input:
        model=model_input,
        cfg=f"{SAE_DIR}/cfg.json",
        weights=f"{SAE_DIR}/sae_weights.safetensors",
        heldout=f"{SAE_DIR}/heldout.json",
    output:
        report(f"{SAE_DIR}/loss_recovered.json", caption="../report/loss_recovered.rst", category="SAE"),
    params:
        model=model_path(),
        dtype=config["model"]["dtype"],
        device=config["model"]["device"],
        hook_point=config["model"]["hook_point"],
        corpus=corpus_params("train", "prompts", "text_prompts", "max_images", "text_source"),  # the training corpus, rebuilt for its held-out samples
        max_image_pixels=config["extract"]["max_image_pixels"],
        loss_recovered=keys("loss_recovered", "max_samples"),
        script=script_hash_of("loss_recovered.py"),
    log:
        run_log("loss_recovered"),
    benchmark:
        run_benchmark("loss_recovered")
    threads: workflow.cores
    resources:
        gpu=1,
    conda:
        "../envs/model.yaml"
    script:
        "../workflow_scripts/loss_recovered.py"
