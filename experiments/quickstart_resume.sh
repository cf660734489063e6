#!/usr/bin/env bash
# Is an interrupted-then-resumed quickstart identical to an uninterrupted one? Runs the README's quickstart
# command in runs/quickstart-resumed, sends it SIGINT (Ctrl-C) once step 19 is logged, continues it with
# --resume, and compares its final table, metrics and weights with the uninterrupted run that
# experiments/quickstart.sh leaves in runs/quickstart. Writes results/quickstart/resume-check.json.
#   bash experiments/quickstart.sh && bash experiments/quickstart_resume.sh      # ~20 min on 2 CPU cores
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
run=runs/quickstart-resumed
out=results/quickstart
command="cacheaug train --config configs/quickstart.yaml --train.output_dir $run"
rm -rf "$run"
mkdir -p "$out"
$command > "$out/resume-part1.log" 2>&1 &
pid=$!
until [ -f "$run/metrics.jsonl" ] && grep -q '"step": 19,' "$run/metrics.jsonl"; do
    kill -0 "$pid" 2>/dev/null || { echo "training ended before step 19"; exit 1; }
    sleep 0.5
done
kill -INT "$pid"
wait "$pid" || true
interrupted_at=$(ls "$run" | grep '^step-' | tail -1)
$command --resume > "$out/resume-part2.log" 2>&1
python - "$run" "$interrupted_at" "$command" > "$out/resume-check.json" <<'PY'
import json, subprocess, sys
from pathlib import Path
import torch
from safetensors.torch import load_file
resumed, interrupted_at, command = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
straight = Path("runs/quickstart")
final = sorted(p.name for p in straight.glob("step-*"))[-1]
a = load_file(straight / final / "coprocessor.safetensors")
b = load_file(resumed / final / "coprocessor.safetensors")
weights_equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
max_diff = max(float((a[k] - b[k]).abs().max()) for k in a)
def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line]
ma, mb = lines(straight / "metrics.jsonl"), lines(resumed / "metrics.jsonl")
def losses(records):
    return {r["step"]: r["loss"] for r in records if "loss" in r and r.get("split") != "validation"}
la, lb = losses(ma), losses(mb)
first_diff = next((s for s in sorted(la) if la[s] != lb.get(s)), None)
print(json.dumps({
    "command": command + "  (SIGINT after step 19 was logged, then --resume)",
    "interrupted_checkpoint": interrupted_at,
    "final_checkpoint": final,
    "weights_bit_identical": weights_equal,
    "max_abs_weight_difference": max_diff,
    "final_table_identical": (straight / "final_table.md").read_text() == (resumed / "final_table.md").read_text(),
    "final_eval_identical": json.loads((straight / "final_eval.json").read_text()) == json.loads((resumed / "final_eval.json").read_text()),
    "first_step_whose_loss_differs": first_diff,
    "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
}, indent=2))
PY
cat "$out/resume-check.json"
