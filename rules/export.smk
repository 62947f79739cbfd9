rule export:
    """A Neuronpedia import folder for the selected features and a Hub-ready SAELens folder (no upload)."""
    input:
        unpack(export_inputs),
        model=model_input,
        codes=CODES,
        metrics=f"{SAE_DIR}/metrics.json",
        weights=f"{SAE_DIR}/sae_weights.safetensors",
        sparsity=f"{SAE_DIR}/sparsity.safetensors",  # copied into the Hub folder
        stats=f"{FEATURES}/stats.parquet",
        selected=f"{FEATURES}/selected.json",
        maps=f"{MAPS}/maps.parquet",
        contexts=f"{MAPS}/contexts.parquet",
    output:
        neuronpedia=directory(f"{EXPORT}/neuronpedia"),
        hub=directory(f"{EXPORT}/hub"),
    params:
        export=keys("export", "release", "source_set", "hub_repo_id", "top_logits", "logits_norm_weight"),
        model=model_path(),
        dtype=config["model"]["dtype"],  # the unembedding is read at the model's dtype (logits in float32)
        hook_point=config["model"]["hook_point"],
        corpus_train=corpus_params("train", "prompts", "text_prompts", "max_images", "text_source"),
        script=script_hash_of("export.py"),
    log:
        run_log("export"),
    threads: 1
    resources:
        gpu=0,
    conda:
        "../envs/export.yaml"
    script:
        "../workflow_scripts/export.py"
