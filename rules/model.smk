rule build_demo_model:
    """Build the embedded LLaVA-NeXT demo model (SmolLM2 language weights, random vision tower)."""
    output:
        directory(DEMO_MODEL_DIR),
    params:
        demo=keys("demo_model", "image_size", "patch_size", "vision_hidden_size", "vision_layers", "seed"),
        script=script_hash_of("build_demo_model.py"),
    log:
        "results/logs/build_demo_model.log",
    benchmark:
        "results/benchmarks/build_demo_model.tsv"
    threads: 2
    resources:
        gpu=0,
    conda:
        "../envs/model.yaml"
    script:
        "../workflow_scripts/build_demo_model.py"
