rule repair:
    """Answer repair: rank the features behind each configured wrong answer by attribution, ablate the
    top text features / clamp up the top image features within a budget, beside matched random controls."""
    input:
        model=model_input,
        cfg=f"{SAE_DIR}/cfg.json",
        weights=f"{SAE_DIR}/sae_weights.safetensors",
    output:
        f"{REPAIR}/repair.parquet",
    params:
        model=model_path(),
        dtype=config["model"]["dtype"],
        device=config["model"]["device"],
        hook_point=config["model"]["hook_point"],
        repair=keys("repair", "cases", "budget", "ablate_values", "clamp_values", "control_draws", "seed",
                    "max_new_tokens", "max_ppl_ratio"),
        script=script_hash_of("repair.py"),
    log:
        run_log("repair"),
    benchmark:
        run_benchmark("repair")
    threads: workflow.cores
    resources:
        gpu=1,
    conda:
        "../envs/model.yaml"
    script:
        "../workflow_scripts/repair.py"
