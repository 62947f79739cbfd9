rule list_images:
    """Every image of corpus.interpret, used, converted or skipped with the reason: the listing that stages needing
    images but not activations (find_neurons) share; it depends on where the images are, not on prompts."""
    output:
        IMAGES,
    params:
        corpus=corpus_params("interpret", "max_images"),
        max_image_pixels=config["extract"]["max_image_pixels"],
        script=script_hash_of("list_images.py"),
    log:
        "results/logs/list_images.log",
    threads: 1
    conda:
        "../envs/model.yaml"
    script:
        "../workflow_scripts/list_images.py"


rule find_neurons:
    """Caption images, find their nouns, score all FFN neurons gradient-free, map and test the top ones."""
    input:
        model=model_input,
        images=IMAGES,  # the usable images (the corpus listing, not a fresh scan; prompts do not matter)
    output:
        captions=f"{NEURONS}/captions.parquet",
        neurons=f"{NEURONS}/neurons.parquet",
        tokens=f"{NEURONS}/tokens.parquet",
        properties=report(f"{NEURONS}/properties.json", caption="../report/neurons.rst", category="Neurons"),
        cases=f"{NEURONS}/cases.pt",
    params:
        model=model_path(),
        dtype=config["model"]["dtype"],
        device=config["model"]["device"],
        neurons=keys("neurons", "prompt", "prompt_prefix", "text_prompts", "max_images", "max_new_tokens", "coefficient",
                     "top_k", "heatmap_neurons", "top_tokens", "causal_k", "noise_scales", "fluency_tolerance", "causal_cases", "seed"),
        script=script_hash_of("find_neurons.py"),
    log:
        "results/logs/find_neurons.log",
    benchmark:
        "results/benchmarks/find_neurons.tsv"
    threads: workflow.cores
    resources:
        gpu=1,
    conda:
        "../envs/neurons.yaml"
    script:
        "../workflow_scripts/find_neurons.py"


rule edit_neurons:
    """Edit source nouns into target nouns through the top neurons' W_out; measure success, generality, locality."""
    input:
        model=model_input,
        cases=f"{NEURONS}/cases.pt",
    output:
        f"{NEURONS}/edits/edits.parquet",
    params:
        model=model_path(),
        dtype=config["model"]["dtype"],
        device=config["model"]["device"],
        neurons=keys("neurons", "prompt_prefix", "max_new_tokens", "edit_k", "eta", "opt_steps", "edits", "locality_prompts"),
        script=script_hash_of("edit_neurons.py"),
    log:
        "results/logs/edit_neurons.log",
    benchmark:
        "results/benchmarks/edit_neurons.tsv"
    threads: workflow.cores
    resources:
        gpu=1,
    conda:
        "../envs/neurons.yaml"
    script:
        "../workflow_scripts/edit_neurons.py"
