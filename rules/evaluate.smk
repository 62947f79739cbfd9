rule refine_explanations:
    """Reduce each explanation to a short phrase and label its category (small LLM behind an endpoint)."""
    input:
        unpack(refine_inputs),
        explanations=f"{EXPLANATIONS}/explanations.parquet",
    output:
        f"{EVALUATION}/refined.parquet",
    params:
        endpoint=refiner_endpoint_params(),
        categorizer=categorizer_endpoint_params(),
        prompt=refine_prompt_params(),
        include_untagged=config["evaluate"]["include_untagged"],
        script=script_hash_of("refine.py"),
        cache=f"{EXPLANATIONS}/cache.sqlite",
        slots=f"{EXPLANATIONS}/.slots",
    log:
        run_log("refine_explanations"),
    threads: 1
    resources:
        gpu=1 if "local" in (refiner_endpoint_params()["server"], categorizer_endpoint_params()["server"]) else 0,
        endpoint_slots=1,
    conda:
        "../envs/explain.yaml"
    script:
        "../workflow_scripts/refine.py"


rule evaluate:
    """IoU against activated regions and CLIP score, explained vs random images; Table 1."""
    input:
        refined=f"{EVALUATION}/refined.parquet",
        top=f"{FEATURES}/top_samples.parquet",
        codes=CODES,
        samples=CODE_SAMPLES,  # the interpretation corpus's samples
    output:
        scores=f"{EVALUATION}/scores.parquet",
        table=report(f"{EVALUATION}/table.md", caption="../report/table1.rst", category="Evaluation"),
        summary=f"{EVALUATION}/summary.json",
    params:
        evaluate=keys("evaluate", "detector", "segmenter", "clip", "clip_backend", "box_threshold", "text_threshold",
                      "threshold", "region", "sam_masks", "n_random_images", "iou_trials", "clip_trials", "n_boot", "seed"),
        device=config["model"]["device"],
        script=script_hash_of("evaluate.py"),
    log:
        run_log("evaluate"),
    benchmark:
        run_benchmark("evaluate")
    threads: workflow.cores
    resources:
        gpu=1,
    conda:
        "../envs/evaluate.yaml"
    script:
        "../workflow_scripts/evaluate.py"


rule score_explanations:
    """Detection and fuzzing scores (after delphi) of each explanation and a shuffled one, on held-out examples."""
    input:
        unpack(scoring_inputs),
    output:
        scores=report(f"{EVALUATION}/scoring.parquet", caption="../report/scoring.rst", category="Evaluation"),
        summary=f"{EVALUATION}/scoring_summary.json",
    params:
        endpoint=scorer_endpoint_params(),
        prompt=scoring_prompt_params(),
        scoring=keys("scoring", "n_examples", "max_features", "seed", "include_untagged", "fuzz_threshold",
                     "n_quantiles", "per_quantile", "mode", "top_logprobs", "prompts"),
        script=script_hash_of("score_explanations.py"),
        cache=f"{EXPLANATIONS}/cache.sqlite",
        slots=f"{EXPLANATIONS}/.slots",
    log:
        run_log("score_explanations"),
    benchmark:
        run_benchmark("score_explanations")
    threads: 1
    resources:
        gpu=1 if scorer_endpoint_params()["server"] == "local" else 0,
        endpoint_slots=1,
    conda:
        "../envs/scoring.yaml"
    script:
        "../workflow_scripts/score_explanations.py"
