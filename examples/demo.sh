#!/usr/bin/env bash
# The quickstart demo: the same training job twice under `orchestrator launch`, once
# uninterrupted and once with worker rank 1 SIGKILLed mid-epoch, then proof that both runs end
# with bit-identical training state (same content digest of every snapshot, final included).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DEMO_DIR:-demo-run}
STEPS=${DEMO_STEPS:-400}
rm -rf "$OUT"
mkdir -p "$OUT"
export OMP_NUM_THREADS=1

run() {  # run NAME [env...]: one launch, its logs kept in $OUT/NAME.log
  local name=$1; shift
  env "$@" orchestrator launch --nproc-per-node 2 --checkpoint-dir "$OUT/$name" \
    --checkpoint-every 25 --max-restarts 3 \
    examples/digits_cnn.py --steps "$STEPS" --seed 7 >"$OUT/$name.log" 2>&1 \
    || { echo "run $name failed, see $OUT/$name.log"; tail -30 "$OUT/$name.log"; exit 1; }
}

echo "== 1/3  uninterrupted reference run ($STEPS steps, 2 ranks, snapshot every 25 steps)"
run reference ORCH_LOG_FORMAT=json
echo "== 2/3  the same run, worker rank 1 SIGKILLed right after step 137 (mid-epoch)"
run faulty ORCH_LOG_FORMAT=json ORCH_FAULTS=step_end@137:rank=1
grep -h '"supervisor.attempt_failed"' "$OUT/faulty/run/events.jsonl" | head -1 || true
echo
orchestrator status --checkpoint-dir "$OUT/faulty"   # its goodput line: time lost to the kill
orchestrator report --checkpoint-dir "$OUT/faulty" --out "$OUT/report.html"
echo
orchestrator snapshots --checkpoint-dir "$OUT/faulty" --verify
echo
echo "== 3/3  compare every snapshot's content digest with the reference run"
python - "$OUT" <<'PY'
import json, subprocess, sys
out = sys.argv[1]
def digests(name):
    raw = subprocess.run(["orchestrator", "snapshots", "--checkpoint-dir", f"{out}/{name}",
                          "--verify", "--json"], check=True, capture_output=True, text=True).stdout
    return {s["step"]: s["digest"] for s in json.loads(raw) if s["valid"]}
ref, faulty = digests("reference"), digests("faulty")
final = max(ref)
same = all(ref[s] == d for s, d in faulty.items()) and faulty.get(final) == ref[final]
print(f"final step {final}: reference {ref[final][:23]}...  recovered {faulty.get(final, '-')[:23]}...")
print("bit-identical: " + ("YES" if same else "NO"))
sys.exit(0 if same else 1)
PY
