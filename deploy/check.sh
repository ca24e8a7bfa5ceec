#!/usr/bin/env bash
# Checks the monitoring files of deploy/ without a running Prometheus or Grafana:
#   - promtool: prometheus.yml, alerts.yml and the alert unit tests in alerts_test.yml;
#   - the Grafana dashboard: valid JSON, every query uses only metric names of the
#     coordinator's metric contract (below) and filters on run_id=~"$run_id", and every query
#     parses as PromQL (promtool checks them as recording rules);
#   - alerts.yml mentions only metric names of the contract.
# Needs promtool (Debian: apt-get install prometheus) and python3. PROMTOOL may name another
# promtool command, e.g.
#   PROMTOOL="docker run --rm -v $PWD:$PWD -v /tmp:/tmp -w $PWD --entrypoint promtool prom/prometheus:v3.5.0"
# (run from the repository root; the parsed dashboard queries go to a temporary folder in /tmp).
# Exits nonzero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

PROMTOOL="${PROMTOOL:-promtool}"
# Word splitting is wanted: PROMTOOL may be a command with arguments.
# shellcheck disable=SC2206
promtool=($PROMTOOL)
command -v "${promtool[0]}" >/dev/null || { echo "check.sh: ${promtool[0]} not found (apt-get install prometheus)" >&2; exit 2; }
command -v python3 >/dev/null || { echo "check.sh: python3 not found" >&2; exit 2; }

step() { printf '\n=== %s\n' "$1"; }

step "promtool check config"
"${promtool[@]}" check config deploy/prometheus/prometheus.yml

step "promtool check rules"
"${promtool[@]}" check rules deploy/prometheus/alerts.yml

step "promtool test rules"
"${promtool[@]}" test rules deploy/prometheus/alerts_test.yml

step "dashboard JSON"
python3 -m json.tool deploy/grafana/dashboards/lorafleet.json >/dev/null
echo "deploy/grafana/dashboards/lorafleet.json parses"

step "dashboard queries and alert metric names against the metric contract"
tmp="$(mktemp -d /tmp/lorafleet-check.XXXXXX)"
trap 'rm -rf "$tmp"' EXIT
python3 - deploy/grafana/dashboards/lorafleet.json deploy/prometheus/alerts.yml "$tmp/dashboard_rules.yml" <<'PY'
import json
import re
import sys

dashboard_path, alerts_path, rules_out = sys.argv[1:4]

# The coordinator's metric contract (deploy/README.md, "Metrics").
GAUGES = """step total_steps epoch train_loss eval_loss learning_rate grad_norm tokens_per_second
samples_per_second workers_expected workers_joined workers_alive build_info generation
recovery_seconds_total""".split()
COUNTERS = """tokens_total samples_total steps_total checkpoints_written_total nonfinite_total
skipped_steps_total workers_lost_total recoveries_total fenced_messages_total replayed_steps_total""".split()
WORKER_GAUGES = """worker_tokens_per_second worker_samples_per_second worker_heartbeat_age_seconds worker_up
worker_resident_memory_bytes worker_device_memory_used_bytes worker_device_memory_peak_bytes
worker_device_memory_total_bytes""".split()
HISTOGRAMS = ["step_phase_seconds"]
ALLOWED = {"lorafleet_" + n for n in GAUGES + COUNTERS + WORKER_GAUGES}
ALLOWED |= {f"lorafleet_{h}_{s}" for h in HISTOGRAMS for s in ("bucket", "sum", "count")}

# The only variables the queries may use (an integration test substitutes exactly these).
VARIABLES = {"$run_id", "$__rate_interval", "$__interval"}
RUN_FILTER = 'run_id=~"$run_id"'
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
            "group_right", "inf", "nan", "start", "end"}

errors = []


def metric_names(expr):
    """Metric names of a PromQL expression: identifiers that are not functions, aggregations,
    keywords, labels, numbers or durations."""
    e = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)  # strings
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # ranges and subqueries
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)  # label lists
    e = re.sub(r"\boffset\s+-?[0-9a-z]+", " ", e)
    e = re.sub(r"(?<![A-Za-z_:])\d+(?:\.\d*)?(?:[eE][+-]?\d+)?", " ", e)  # numbers
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        word = m.group(0)
        if word.lower() in KEYWORDS or re.match(r"\s*\(", e[m.end():]):
            continue
        names.add(word)
    return names


def check_expr(where, expr, need_run_filter):
    if not expr.strip():
        errors.append(f"{where}: empty expr")
        return
    for name in sorted(metric_names(expr)):
        if name not in ALLOWED:
            errors.append(f"{where}: {name} is not a metric of the contract: {expr}")
    for var in set(re.findall(r"\$\{?\w+\}?", expr)):
        if var not in VARIABLES:
            errors.append(f"{where}: variable {var} (only {sorted(VARIABLES)}): {expr}")
    if need_run_filter:
        for m in re.finditer(r"\b(lorafleet_\w+)\s*(\{[^}]*\})?", expr):
            if RUN_FILTER not in (m.group(2) or ""):
                errors.append(f"{where}: {m.group(1)} without {RUN_FILTER}: {expr}")


def panels_of(panels):
    for p in panels:
        yield p
        yield from panels_of(p.get("panels", []))


with open(dashboard_path) as f:
    dash = json.load(f)
if dash.get("uid") != "lorafleet":
    errors.append(f"dashboard uid is {dash.get('uid')!r}, not 'lorafleet'")

variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
run_var = variables.get("run_id")
if run_var is None:
    errors.append("dashboard has no run_id template variable")
else:
    q = run_var.get("query")
    q = q.get("query", "") if isinstance(q, dict) else q or ""
    if q.replace(" ", "") != "label_values(lorafleet_step,run_id)":
        errors.append(f"run_id variable query is {q!r}, not label_values(lorafleet_step, run_id)")

exprs = []  # (panel title, expr)
ids = set()
npanels = 0
for p in panels_of(dash.get("panels", [])):
    if p.get("id") in ids:
        errors.append(f"duplicate panel id {p.get('id')}")
    ids.add(p.get("id"))
    if p.get("type") == "row":
        continue
    npanels += 1
    title = p.get("title", f"panel {p.get('id')}")
    targets = p.get("targets", [])
    if not targets:
        errors.append(f"panel {title!r} has no query")
    refs = [t.get("refId") for t in targets]
    if len(set(refs)) != len(refs):
        errors.append(f"panel {title!r}: duplicate refId")
    for t in targets:
        expr = t.get("expr", "")
        check_expr(f"panel {title!r} {t.get('refId')}", expr, need_run_filter=True)
        exprs.append((title, expr))

# Alerts: every lorafleet_ name in the file (expressions and annotations) must be in the contract.
with open(alerts_path) as f:
    for n, line in enumerate(f, 1):
        for name in re.findall(r"\blorafleet_[a-z0-9_]+", line):
            if name not in ALLOWED:
                errors.append(f"{alerts_path}:{n}: {name} is not a metric of the contract")

# Every dashboard query as a recording rule, so that promtool parses it (variables substituted
# as the integration test does).
with open(rules_out, "w") as f:
    f.write("groups:\n  - name: dashboard\n    rules:\n")
    for i, (title, expr) in enumerate(exprs):
        e = expr.replace("$run_id", "check").replace("$__rate_interval", "1m").replace("$__interval", "1m")
        f.write(f"      - record: dashboard:query_{i}\n        expr: {json.dumps(e)}\n")

if errors:
    print("\n".join(errors), file=sys.stderr)
    sys.exit(1)
print(f"{len(exprs)} queries in {npanels} panels use only contract metrics and filter on run_id")
PY

step "dashboard queries parse as PromQL"
"${promtool[@]}" check rules "$tmp/dashboard_rules.yml"

step "all checks passed"
