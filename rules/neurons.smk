rule find_neurons:
    """Caption images, find their nouns, score all FFN neurons gradient-free, map and test the top ones."""
    input:
        model=model_input,
        samples="results/activations/samples.parquet",
    output:
        captions=f"{NEURONS}/captions.parquet",
        neurons=f"{NEURONS}/neurons.parquet",
        tokens=f"{NEURONS}/tokens.parquet",
        properties=f"{NEURONS}/properties.json",
        cases=f"{NEURONS}/cases.pt",
    params:
        model=model_path(),
        dtype=config["model"]["dtype"],
        device=config["model"]["device"],
        neurons=config["neurons"],
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
        neurons=config["neurons"],
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
