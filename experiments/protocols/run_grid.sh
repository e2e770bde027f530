#!/usr/bin/env bash
# The protocols table (issue 4): CoOp and KgCoOp × FedAvg / FedProx / SCAFFOLD × global / personal / base2novel,
# seeds 0,1,2, on the synthetic suite with the default federation (10 clients, one rendering domain each, 8 shots per
# class and domain, AdamW local steps) except **5 rounds instead of 10**, to fit 54 runs on 2 shared CPU cores.
# Records go to experiments/protocols/results/records/; the tables are made from them by flbench.report.
#   bash experiments/protocols/run_grid.sh            # runs what is missing (existing records are skipped), then tables
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
OUT=experiments/protocols/results
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=disabled HF_HUB_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0
export FLBENCH_CACHE=${FLBENCH_CACHE:-$PWD/.cache/flbench}  # the tiny CLIP and images, built once

"$PY" -m flbench --multirun algorithm=coop,kgcoop protocol=fedavg,fedprox,scaffold \
    scenario=global,personal,base2novel seed=0,1,2 num_rounds=5 results_dir="$OUT" logger.mode=disabled

TABLE=experiments/protocols/table.md
{
  echo "# Protocols on the synthetic suite (CoOp, KgCoOp × FedAvg, FedProx, SCAFFOLD)"
  echo
  echo "Made by \`bash experiments/protocols/run_grid.sh\` from the records in \`$OUT/records/\`: default experiment"
  echo "(synthetic shapes, 4 domains, 10 clients with one domain each, 8 shots per class and domain, tiny CLIP, AdamW)"
  echo "but **5 rounds** instead of 10; FedProx μ = 1.0, SCAFFOLD option I. Mean ± sample std over seeds 0, 1, 2."
  echo "HM is the HM of the averaged base and novel accuracies. Wall times were measured on 2 CPU cores shared with"
  echo "other jobs: compare them only within this table, and loosely."
  for selection in best_val last; do
    for spec in "global:global" "personal:personal,personal_mean" "base2novel:base,novel,hm"; do
      scenario=${spec%%:*}; metrics=${spec#*:}
      echo
      echo "## scenario=$scenario, $selection"
      echo
      "$PY" -m flbench.report "$OUT" --filter "scenario.name=$scenario" --rows algorithm.name,protocol.name \
          --metrics "$metrics" --selection "$selection"
    done
  done
} > "$TABLE"
cat "$TABLE"
