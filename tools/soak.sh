#!/usr/bin/env bash
# Soak benchmark (not a test): WORKERS local CPU workers train STEPS steps of the tiny fixture
# model over loopback while KILLS random workers are killed with SIGKILL at random moments.
# Reports: whether the run finished, whether its adapter is byte-identical to an undisturbed
# run's (REFERENCE=1, the default), each recovery's downtime (loss -> restored state) and
# replayed steps, and the resident memory of the coordinator and of the workers near the start
# and near the end (flat = no leak across recoveries).
#
#   tools/soak.sh                       # 8 workers, 1000 steps, 5 kills, target/debug
#   BIN=target/release/coordinator WORKERS=4 STEPS=400 KILLS=3 tools/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-target/debug/coordinator}
WORKERS=${WORKERS:-8}
STEPS=${STEPS:-1000}
KILLS=${KILLS:-5}
SAVE=${SAVE:-50}
REFERENCE=${REFERENCE:-1}
SEED=${SEED:-$RANDOM}
[ -x "$BIN" ] || { echo "build $BIN first (cargo build -p lorafleet-coordinator)" >&2; exit 2; }
work=$(mktemp -d)
trap 'pkill -KILL -P $$ 2>/dev/null || true; rm -rf "$work"' EXIT
RANDOM=$SEED

args=(--base_model tests/fixtures/tiny-llama --data_path tests/fixtures/tiny-llama/data/alpaca_sample.jsonl
  --workers "$WORKERS" --batch_size $((2 * WORKERS)) --micro_batch_size 2 --val_set_size 16 --cutoff_len 128
  --max_steps "$STEPS" --save_steps "$SAVE" --eval_steps 0 --logging_steps 10 --learning_rate 1e-3
  --warmup_steps 10 --max_restarts $((KILLS + 2)) --metrics-addr 0)

stamp() { while IFS= read -r line; do printf '%s %s\n' "$(date +%s.%N)" "$line"; done; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
workers_of() { pgrep -P "$1" -f -- '--join' || true; }
step_now() { grep -o '^[0-9.]* step [0-9]*' "$1" | tail -1 | awk '{print $3}'; }
sample() { # coordinator-pid label
  local w total=0 n=0
  for w in $(workers_of "$1"); do total=$((total + $(rss_kib "$w"))); n=$((n + 1)); done
  printf '%-6s step %5s: coordinator %6d KiB, %d workers %7d KiB (%d KiB each on average)\n' \
    "$2" "$(step_now "$work/soak.log")" "$(rss_kib "$1")" "$n" "$total" $((n > 0 ? total / n : 0))
}

if [ "$REFERENCE" = 1 ]; then
  echo "undisturbed reference run ($WORKERS workers, $STEPS steps)..."
  t0=$(date +%s)
  "$BIN" "${args[@]}" --output_dir "$work/reference" >/dev/null 2>"$work/reference.log"
  echo "  done in $(( $(date +%s) - t0 )) s"
fi

echo "soak run: $WORKERS workers, $STEPS steps, $KILLS kills (seed $SEED)"
t0=$(date +%s)
"$BIN" "${args[@]}" --output_dir "$work/soak" > /dev/null 2> >(stamp > "$work/soak.log") &
coord=$!
until [ "$(step_now "$work/soak.log")" ] && [ "$(step_now "$work/soak.log")" -ge 20 ]; do sleep 0.2; done
sample "$coord" first | tee "$work/rss"
# Kill times spread over the run: each after a random 10-90% of the steps left per kill.
for k in $(seq 1 "$KILLS"); do
  now=$(step_now "$work/soak.log")
  target=$(( now + (STEPS - now) / (KILLS - k + 2) * (10 + RANDOM % 80) / 100 ))
  until [ "$(step_now "$work/soak.log")" -ge "$target" ] || ! kill -0 "$coord" 2>/dev/null; do sleep 0.05; done
  sleep "0.$((RANDOM % 10))"
  mapfile -t ws < <(workers_of "$coord")
  [ "${#ws[@]}" -gt 0 ] || break
  victim=${ws[$((RANDOM % ${#ws[@]}))]}
  echo "kill $k: worker pid $victim near step $(step_now "$work/soak.log")"
  kill -KILL "$victim" 2>/dev/null || true
  # Wait for the recovery before the next kill.
  until [ "$(grep -c 'recovered: every rank' "$work/soak.log")" -ge "$k" ] || ! kill -0 "$coord" 2>/dev/null; do sleep 0.1; done
done
until [ "$(step_now "$work/soak.log")" -ge $((STEPS - 30)) ] || ! kill -0 "$coord" 2>/dev/null; do sleep 0.2; done
kill -0 "$coord" 2>/dev/null && sample "$coord" last | tee -a "$work/rss"
status=0; wait "$coord" || status=$?
echo "soak run ended with status $status after $(( $(date +%s) - t0 )) s"
grep -E 'lost worker|recovered:|exited|no replacement|error' "$work/soak.log" | sed 's/^[0-9.]* /  /' || true

# Downtime per recovery: the loss line to the next "recovered" line; replayed steps: the
# steps logged before the loss minus the restored step.
awk '
  / lost worker / { lost = $1; for (i = 1; i <= NF; i++) if ($i == "from" && $(i+1) == "step") from = $(i+2) }
  / step [0-9]+ loss / { for (i = 1; i <= NF; i++) if ($i == "step") last = $(i+1) }
  /recovered: every rank/ && lost {
    n++; down = $1 - lost; total += down
    printf "  recovery %d: %.2f s from the loss to the restored state, %d steps replayed (from step %d)\n", n, down, last - from, from
    lost = 0
  }
  END { if (n) printf "  %d recoveries, %.2f s downtime on average\n", n, total / n }
' "$work/soak.log"
if [ "$REFERENCE" = 1 ] && [ "$status" = 0 ]; then
  if cmp -s "$work/reference/adapter_model.safetensors" "$work/soak/adapter_model.safetensors"; then
    echo "final adapter: byte-identical to the undisturbed run's"
  else
    echo "final adapter: DIFFERS from the undisturbed run's"; status=1
  fi
fi
exit "$status"
