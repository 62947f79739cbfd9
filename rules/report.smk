rule report:
    """One self-contained HTML page: the run, the SAE and a card per selected feature."""
    input:
        unpack(report_inputs),
        model=model_input,  # the demo's mmsae_provenance.json
        activations=ACTIVATIONS,  # the training corpus (tokens trained on)
        codes=CODES,  # the interpretation corpus (samples and images whose top activations are shown; its shards: activation histograms)
        metrics=f"{SAE_DIR}/metrics.json",
        heldout=f"{SAE_DIR}/heldout.json",  # the held-out sample ids, beside metrics.json
        sparsity=f"{SAE_DIR}/sparsity.safetensors",  # log10 density over the training tokens (the density histogram)
        log_table=f"{SAE_DIR}/log.parquet",
        stats=f"{FEATURES}/stats.parquet",
        selected=f"{FEATURES}/selected.json",
        maps=f"{MAPS}/maps.parquet",
        contexts=f"{MAPS}/contexts.parquet",
        # written when the Snakefile loads; ancient: a setting that changes no result reruns nothing
        effective_config=ancient(EFFECTIVE_CONFIG),
    output:
        report(
            REPORT,
            caption="../report/index.rst",
            category="Feature cards",
        ),
        plots=directory(REPORT_PLOTS),  # the page's figures as files (SVG and PNG)
    params:
        model=model_path(),
        demo=is_demo_model(),
        banner=config["report"]["banner"],
        script=script_hash_of("report.py"),
    log:
        run_log("report"),
    threads: 1
    resources:
        gpu=0,
    conda:
        "../envs/report.yaml"
    script:
        "../workflow_scripts/report.py"
