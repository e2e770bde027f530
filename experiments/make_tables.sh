#!/usr/bin/env bash
# Remake committed tables from the front door: for each experiment name, run its sweep and its report, and write
# experiments/<dir>/<file> = both commands, then the report's output. Finished runs are skipped (their records
# exist), killed ones resume.
#   bash experiments/make_tables.sh                      # every table
#   bash experiments/make_tables.sh synthetic_global     # one
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export WANDB_MODE=${WANDB_MODE:-offline} HF_HUB_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0

# name | table file | report arguments (after the records folder)
TABLES=(
  "synthetic_global|experiments/synthetic_global/table.md|--rows algorithm.name"
  "synthetic_base2novel|experiments/synthetic_base2novel/table.md|--rows algorithm.name --metrics base,novel,hm"
  "synthetic_global_slow|experiments/synthetic_global/table_slow.md|--rows algorithm.name"
  "synthetic_personal|experiments/synthetic_personal/table.md|--rows algorithm.name --metrics global,personal,personal_mean,hm"
  "synthetic_protocols|experiments/synthetic_protocols/table.md|--rows protocol.name"
  "synthetic_global_vit|experiments/synthetic_global/table_vit.md|--rows algorithm.name"
  "synthetic_backbones_tiny|experiments/backbones/table_tiny.md|--rows backbone.attention.name --metrics global"
  "synthetic_backbones_vit_image|experiments/backbones/table_vit_image.md|--rows backbone.attention.name --metrics global"
  "synthetic_backbones_vit_both|experiments/backbones/table_vit_both.md|--rows backbone.attention.name --metrics global"
)

for entry in "${TABLES[@]}"; do
  IFS='|' read -r name table report <<<"$entry"
  [ $# -gt 0 ] && [[ " $* " != *" $name "* ]] && continue
  sweep="python -m flbench --multirun +experiment=$name"
  results=$("$PY" -m flbench +experiment="$name" --cfg job | sed -n 's/^results_dir: //p')
  tabulate="python -m flbench.report $results $report"
  "$PY" -m flbench --multirun +experiment="$name"
  mkdir -p "$(dirname "$table")"
  { echo '```bash'; echo "$sweep"; echo "$tabulate"; echo '```'; echo
    "$PY" -m flbench.report "$results" $report; } > "$table.tmp"
  mv "$table.tmp" "$table"
  echo "wrote $table"
done
