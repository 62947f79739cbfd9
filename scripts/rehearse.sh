#!/usr/bin/env bash
# The rehearsal (README, "Rehearsal"): the paper's command, end to end on a CPU, with tiny random models.
#   scripts/rehearse.sh [WORKDIR] [SNAKEMAKE ARGS...]      (WORKDIR default: rehearsal/ in the checkout)
# 1. builds the tiny models and the data under WORKDIR (python -m mmsae.rehearsal build; kept when built),
# 2. starts the scripted OpenAI-compatible endpoint on 127.0.0.1 (the port config/rehearsal.yaml names),
# 3. runs  snakemake --cores 2 --configfile config/llava-next-8b.yaml config/rehearsal.yaml --directory WORKDIR
# 4. stops the endpoint (also when snakemake fails or the script is interrupted).
# PYTHON selects the interpreter (default: the checkout's .venv, else python3); snakemake is taken beside it.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
workdir=${1:-$repo/rehearsal}
[ $# -gt 0 ] && shift
mkdir -p "$workdir"
workdir=$(cd "$workdir" && pwd)
py=${PYTHON:-$repo/.venv/bin/python}
[ -x "$py" ] || py=$(command -v python3)
export PATH="$(dirname "$py"):$PATH"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's mmsae, also in the jobs (a clone beside an installed one)

cd "$repo"
"$py" -m mmsae.rehearsal build "$workdir"
port=$("$py" -m mmsae.rehearsal port config/rehearsal.yaml)
"$py" -m mmsae.rehearsal.server --port "$port" &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT
for _ in $(seq 100); do  # up to 10 s for the endpoint to answer
  if "$py" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=1)" 2>/dev/null; then
    break
  fi
  kill -0 "$server" 2>/dev/null || { echo "rehearse.sh: the endpoint did not start (port $port taken?)" >&2; exit 1; }
  sleep 0.1
done
export EXPLAINER_API_KEY=${EXPLAINER_API_KEY:-rehearsal}  # the paper config's explain.api_key_env; the endpoint ignores it
start=$(date +%s)
snakemake --cores 2 --configfile config/llava-next-8b.yaml config/rehearsal.yaml --directory "$workdir" "$@"
echo "rehearse.sh: snakemake took $(( $(date +%s) - start )) s; report under $workdir/results"
