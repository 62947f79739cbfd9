rule select_top:
    """Per-feature statistics, each feature's top samples, and the features that go forward."""
    input:
        codes=CODES,
        samples=CODE_SAMPLES,  # the interpretation corpus's samples
    output:
        stats=f"{FEATURES}/stats.parquet",
        top=f"{FEATURES}/top_samples.parquet",
        selected=f"{FEATURES}/selected.json",
    params:
        top_n=config["features"]["top_n"],
        rank_by=config["features"]["rank_by"],
        select=config["features"]["select"],
        script=script_hash_of("select_top.py"),
    log:
        run_log("select_top"),
    benchmark:
        run_benchmark("select_top")
    threads: 2
    resources:
        gpu=0,
    conda:
        "../envs/features.yaml"
    script:
        "../workflow_scripts/select_top.py"


rule render_maps:
    """Highlighted regions and heatmaps for each selected feature's top images; top text contexts."""
    input:
        codes=CODES,
        samples=CODE_SAMPLES,  # the interpretation corpus's samples
        top=f"{FEATURES}/top_samples.parquet",
        selected=f"{FEATURES}/selected.json",
    output:
        maps=f"{MAPS}/maps.parquet",
        contexts=f"{MAPS}/contexts.parquet",
    params:
        threshold=config["features"]["map_threshold"],
        script=script_hash_of("render_maps.py"),
    log:
        run_log("render_maps"),
    threads: 1
    resources:
        gpu=0,
    conda:
        "../envs/features.yaml"
    script:
        "../workflow_scripts/render_maps.py"


rule crossmodal:
    """Features active on the image and on the text of the same sample, against shuffled pairs."""
    input:
        codes=CODES,
        samples=CODE_SAMPLES,  # the interpretation corpus's samples: each pair's image and tokens
    output:
        table=f"{FEATURES}/crossmodal.parquet",
        examples=f"{FEATURES}/crossmodal_examples.parquet",
    params:
        crossmodal=config["features"]["crossmodal"],
        threshold=config["features"]["map_threshold"],
        script=script_hash_of("crossmodal.py"),
    log:
        run_log("crossmodal"),
    benchmark:
        run_benchmark("crossmodal")
    threads: 1
    resources:
        gpu=0,
    conda:
        "../envs/features.yaml"
    script:
        "../workflow_scripts/crossmodal.py"
