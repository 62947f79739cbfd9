rule extract:
    """Run the model over one part of corpus.train; store the hooked layer's residual stream as Parquet shards."""
    input:
        model=model_input,
    output:
        manifest="results/activations/part-{part}/manifest.json",
        samples="results/activations/part-{part}/samples.parquet",
    params:
        model=model_path(),
        dtype=config["model"]["dtype"],
        device=config["model"]["device"],
        hook_point=config["model"]["hook_point"],
        corpus=corpus_params("train", "prompts", "text_prompts", "max_images", "text_source"),
        extract=extract_keys("batch_size", "shard_tokens", "dtype", "max_image_pixels", "token_fraction", "seed"),
        parts=config["extract"]["parts"],
        script=script_hash_of("extract.py"),
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
        manifests=expand("results/activations/part-{part}/manifest.json", part=PARTS),
        samples=expand("results/activations/part-{part}/samples.parquet", part=PARTS),
    output:
        manifest=ACTIVATIONS,
        samples=SAMPLES,
    params:
        script=script_hash_of("merge_manifests.py"),
    log:
        "results/logs/merge_activations.log",
    threads: 1
    resources:
        gpu=0,
    conda:
        "../envs/features.yaml"
    script:
        "../workflow_scripts/merge_manifests.py"
