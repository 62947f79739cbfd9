rule explain_chunk:
    """Explain one chunk of the selected features through an OpenAI-compatible endpoint."""
    input:
        unpack(explain_inputs),
    output:
        f"{EXPLANATIONS}/chunks/chunk-{{chunk}}.parquet",
    params:
        endpoint=explain_endpoint_params(),
        prompt=explain_prompt_params(),
        max_images=config["explain"]["max_images"],
        n_chunks=config["explain"]["chunks"],
        script=script_hash_of("explain.py"),
        cache=f"{EXPLANATIONS}/cache.sqlite",
        slots=f"{EXPLANATIONS}/.slots",
    wildcard_constraints:
        chunk=r"\d+",
    log:
        f"{RUN}/logs/explain_chunk-{{chunk}}.log",
    benchmark:
        f"{RUN}/benchmarks/explain_chunk-{{chunk}}.tsv"
    threads: 1
    resources:
        gpu=1 if config["explain"]["server"] == "local" else 0,
        endpoint_slots=1,
    conda:
        "../envs/explain.yaml"
    script:
        "../workflow_scripts/explain.py"


rule gather_explanations:
    """Concatenate the chunks into one explanations table; count failures."""
    input:
        expand(f"{EXPLANATIONS}/chunks/chunk-{{chunk}}.parquet", chunk=range(config["explain"]["chunks"])),
    output:
        f"{EXPLANATIONS}/explanations.parquet",
    params:
        script=script_hash_of("gather_explanations.py"),
    log:
        run_log("gather_explanations"),
    threads: 1
    resources:
        gpu=0,
    conda:
        "../envs/explain.yaml"
    script:
        "../workflow_scripts/gather_explanations.py"
