rule extract:
    """Run the model over one part of the corpus; store the hooked layer's residual stream as Parquet shards."""
    input:
        model=model_input,
    output:
        manifest="results/activations/part-{part}/manifest.json",
    params:
        model=model_path(),
        dtype=config["model"]["dtype"],
        device=config["model"]["device"],
        hook_point=config["model"]["hook_point"],
        corpus=config["corpus"],
        extract={k: v for k, v in config["extract"].items() if k != "parts"},
        parts=config["extract"]["parts"],
    wildcard_constraints:
        part=r"\d+",
    log:
        "results/logs/extract-{part}.log",
    benchmark:
        "results/benchmarks/extract-{part}.tsv"
    threads: workflow.cores
    resources:
        gpu=1,
    conda:
        "../envs/model.yaml"
    script:
        "../workflow_scripts/extract.py"


rule merge_activations:
    """One manifest (and samples table) over the extraction parts."""
    input:
        expand("results/activations/part-{part}/manifest.json", part=PARTS),
    output:
        ACTIVATIONS,
        "results/activations/samples.parquet",
    log:
        "results/logs/merge_activations.log",
    threads: 1
    resources:
        gpu=0,
    conda:
        "../envs/features.yaml"
    script:
        "../workflow_scripts/merge_manifests.py"
