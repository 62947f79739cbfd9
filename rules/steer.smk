rule steer:
    """Generate before/after clamping features, over a sweep of clamp values."""
    input:
        unpack(steer_inputs),
        cfg=f"{SAE_DIR}/cfg.json",
        weights=f"{SAE_DIR}/sae_weights.safetensors",
        stats=f"{FEATURES}/stats.parquet",
        selected=f"{FEATURES}/selected.json",
    output:
        report(f"{STEERING}/steering.parquet", caption="../report/steering.rst", category="Steering"),
    params:
        model=model_path(),
        dtype=config["model"]["dtype"],
        device=config["model"]["device"],
        hook_point=config["model"]["hook_point"],
        steer=keys("steer", "features", "match", "auto", "auto_pick", "prompts", "values", "scale", "positions", "mode", "max_new_tokens", "success_max_ppl_ratio"),
        script=script_hash_of("steer.py"),
    log:
        run_log("steer"),
    benchmark:
        run_benchmark("steer")
    threads: workflow.cores
    resources:
        gpu=1,
    conda:
        "../envs/model.yaml"
    script:
        "../workflow_scripts/steer.py"


rule attribute:
    """Attribute each configured answer to SAE features on image and text tokens; validate by ablation."""
    input:
        model=model_input,
        cfg=f"{SAE_DIR}/cfg.json",
        weights=f"{SAE_DIR}/sae_weights.safetensors",
    output:
        summary=report(f"{ATTRIBUTION}/summary.json", caption="../report/attribution.rst", category="Attribution"),
        table=f"{ATTRIBUTION}/attribution.parquet",
    params:
        model=model_path(),
        dtype=config["model"]["dtype"],
        device=config["model"]["device"],
        hook_point=config["model"]["hook_point"],
        attribution=keys("attribution", "method", "pool", "top_k", "validate_top", "cases"),
        script=script_hash_of("attribute.py"),
    log:
        run_log("attribute"),
    benchmark:
        run_benchmark("attribute")
    threads: workflow.cores
    resources:
        gpu=1,
    conda:
        "../envs/model.yaml"
    script:
        "../workflow_scripts/attribute.py"
