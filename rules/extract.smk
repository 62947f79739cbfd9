rule extract:
    """Run the model over the corpus; store the hooked layer's residual stream as Parquet shards."""
    input:
        model=model_input,
    output:
        manifest=ACTIVATIONS,
    params:
        model=model_path(),
        dtype=config["model"]["dtype"],
        device=config["model"]["device"],
        hook_point=config["model"]["hook_point"],
        corpus=config["corpus"],
        extract=config["extract"],
    log:
        "results/logs/extract.log",
    benchmark:
        "results/benchmarks/extract.tsv"
    threads: workflow.cores
    resources:
        gpu=1,
    conda:
        "../envs/model.yaml"
    script:
        "../workflow_scripts/extract.py"
