#!/usr/bin/env bash
# Runs the README's quickstart command and records its outputs under results/quickstart/:
# metrics.jsonl, curves.png, final_table.md, final_eval.json, stdout.txt and run.json (command, commit,
# machine, wall time).   Usage: bash experiments/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
command="cacheaug train --config configs/quickstart.yaml"  # exactly as the README says
rm -rf runs/quickstart
out=results/quickstart
mkdir -p "$out"
start=$(date +%s)
$command 2>&1 | tr '\r' '\n' | grep -v '^train: ' > "$out/stdout.txt" || { tail -20 "$out/stdout.txt"; exit 1; }
wall=$(( $(date +%s) - start ))
cp runs/quickstart/{metrics.jsonl,curves.png,final_table.md,final_eval.json} "$out/"
python - "$command" "$wall" > "$out/run.json" <<'PY'
import json, os, platform, subprocess, sys
import torch
print(json.dumps({
    "command": sys.argv[1],
    "wall_seconds": int(sys.argv[2]),
    "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
    "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
}, indent=2))
PY
cat "$out/final_table.md"; echo "wall time: ${wall} s"
