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
        cache=f"{EXPLANATIONS}/cache.sqlite",
        slots=f"{EXPLANATIONS}/.slots",
    log:
        "results/logs/refine_explanations.log",
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
        activations=ACTIVATIONS,
    output:
        scores=f"{EVALUATION}/scores.parquet",
        table=f"{EVALUATION}/table.md",
        summary=f"{EVALUATION}/summary.json",
    params:
        evaluate={k: v for k, v in config["evaluate"].items() if k not in ("refiner", "categorizer", "include_untagged")},
        device=config["model"]["device"],
    log:
        "results/logs/evaluate.log",
    benchmark:
        "results/benchmarks/evaluate.tsv"
    threads: workflow.cores
    resources:
        gpu=1,
    conda:
        "../envs/evaluate.yaml"
    script:
        "../workflow_scripts/evaluate.py"
