#!/usr/bin/env bash
# Scale-out of our load generator (issue 7) on a many-core machine, in one command:
#
#   bash benchmarks/device_scaleout.sh
#
# from the repository root, with the wheels of .whl/ (the packages `harness sim` and
# `harness load` import that a bare Python 3.12 lacks: locust, gevent, pyzmq, ...; the list is
# benchmarks/device_wheels.txt) next to it; numpy, psutil, prometheus-client, pyyaml must
# already be installed for that Python. It installs the wheels into $SITE (no index, no deps),
# runs from the checkout with PYTHONPATH (nothing of .venv is used), prints the machine, then runs
#   benchmarks/client_cost.py scaleout --streams-per-worker 48 128
# (weak scaling: 1, 2, 4, 8 ... Locust workers, each pinned to its own CPU, over simulators
# pinned one per CPU; the layout comes from the CPU count: 16 CPUs -> master on 1, workers on 8,
# 7 simulators; 64 -> 1 + 32 + 31), stopping new cases after $DEADLINE_S seconds, and writes
# into $OUT (default ./runs/device-scaleout-TIMESTAMP):
#   scaleout.jsonl  one JSON line per case (all raw figures)
#   scaleout.txt    the run's output: one line per case, then the report
#   report.md       the report alone (client_cost.py report --json scaleout.jsonl)
#   machine.txt     nproc, lscpu, topology, Python, package versions
#
# Knobs (environment): PY (python3), SITE (/tmp/site), WHL (.whl: the wheels' folder, relative to
# the repository root or absolute; installed once per SITE), SPW ("48 128": streams per worker),
# WORKERS ("": auto, e.g. "1 2 4 8"), SIMS / SIM_CPUS / CLIENT_CPUS ("": auto), RUN_SECONDS (10:
# steady load per case), REPEATS (1), DEADLINE_S (330), NO_RT (1: no real-time priority),
# EXTRA (more client_cost.py arguments, e.g. "--variants before=DIR after=." for an A/B).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
SITE=${SITE:-/tmp/site}
WHL=${WHL:-.whl}
OUT=${OUT:-runs/device-scaleout-$(date +%Y%m%d-%H%M%S)}
SPW=${SPW:-48 128}
RUN_SECONDS=${RUN_SECONDS:-10}
REPEATS=${REPEATS:-1}
DEADLINE_S=${DEADLINE_S:-330}
# One BLAS thread per process: the processes are pinned to one CPU each anyway.
export OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$OUT"
T0=$(date +%s)

{
  echo "== $(date -u +%FT%TZ) $(uname -srm)"
  echo "nproc: $(nproc)"
  lscpu 2>/dev/null | grep -E '^(Architecture|CPU\(s\)|On-line|Model name|Thread|Core|Socket|NUMA node|CPU max MHz|L3)' || true
  echo "-- lscpu -e"
  lscpu -e=CPU,CORE,SOCKET,NODE 2>/dev/null || true
  echo "-- python: $($PY -V 2>&1) at $(command -v "$PY")"
  echo "-- rt: sched_rt_runtime_us=$(cat /proc/sys/kernel/sched_rt_runtime_us 2>/dev/null);" \
       "chrt $(chrt -f 1 true 2>/dev/null && echo works || echo 'not usable');" \
       "taskset $(command -v taskset >/dev/null && echo yes || echo no)"
  echo "-- cgroup cpu.max: $(cat /sys/fs/cgroup/cpu.max 2>/dev/null || echo none); affinity: $(taskset -pc $$ 2>/dev/null | sed "s/.*: //")"
  echo "-- loadavg: $(cat /proc/loadavg)"
} 2>&1 | tee "$OUT/machine.txt"

if [ -f "$SITE/.device_scaleout_installed" ]; then
  echo "== wheels already installed in $SITE"
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
elif ls "$WHL"/*.whl >/dev/null 2>&1; then
  echo "== installing $(ls "$WHL"/*.whl | wc -l) wheels into $SITE"
  if [ "${FORCE_UNZIP:-0}" != 1 ] && "$PY" -m pip --version >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$WHL"/*.whl > "$OUT/pip.log" 2>&1 \
      || { cat "$OUT/pip.log"; echo "pip install of $WHL/ failed"; exit 2; }
  else
    # No pip for this Python: a wheel is a zip of what goes into site-packages (only greenlet
    # has a .data/ part, its C headers, not needed).
    echo "(no pip: unpacking the wheels)"
    "$PY" - "$SITE" "$WHL"/*.whl <<'EOF' || { echo "unpacking $WHL/ failed"; exit 2; }
import os, sys, zipfile
site = sys.argv[1]
os.makedirs(site, exist_ok=True)
for w in sys.argv[2:]:
    with zipfile.ZipFile(w) as z:
        z.extractall(site, [n for n in z.namelist() if not n.split("/", 1)[0].endswith(".data")])
EOF
  fi
  touch "$SITE/.device_scaleout_installed"
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "== no .whl/ here: using the packages $PY already has"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
echo "PYTHONPATH=$PYTHONPATH"
"$PY" -W ignore - <<'EOF' 2>&1 | tee -a "$OUT/machine.txt" || exit 3
import importlib, sys
mods = ["locust", "gevent", "greenlet", "zmq", "geventhttpclient", "orjson", "hdrh", "msgpack",
        "flask", "configargparse", "numpy", "psutil", "prometheus_client", "yaml"]
vers = []
for m in mods:
    mod = importlib.import_module(m)
    vers.append(f"{m} {getattr(mod, '__version__', getattr(mod, 'VERSION', '?'))}")
import harness.plugin, harness.llm_user, servers.simulator.server  # noqa: F401,E401
print("-- imports ok:", ", ".join(vers))
EOF
"$PY" -m harness.cli sim --help >/dev/null || { echo "harness sim does not start"; exit 3; }
echo "== setup took $(( $(date +%s) - T0 )) s"

args=(scaleout --python "$PY" --streams-per-worker $SPW --seconds "$RUN_SECONDS"
      --repeats "$REPEATS" --deadline-s "$DEADLINE_S" --json "$OUT/scaleout.jsonl")
[ -n "${WORKERS:-}" ] && args+=(--workers-list $WORKERS)
[ -n "${SIMS:-}" ] && args+=(--sims "$SIMS")
[ -n "${SIM_CPUS:-}" ] && args+=(--sim-cpus "$SIM_CPUS")
[ -n "${CLIENT_CPUS:-}" ] && args+=(--client-cpus "$CLIENT_CPUS")
[ "${NO_RT:-0}" = 1 ] && args+=(--no-rt)
# shellcheck disable=SC2206
[ -n "${EXTRA:-}" ] && args+=($EXTRA)
echo "== $PY benchmarks/client_cost.py ${args[*]}"
"$PY" benchmarks/client_cost.py "${args[@]}" 2>&1 | tee "$OUT/scaleout.txt"
rc=${PIPESTATUS[0]}
if [ -s "$OUT/scaleout.jsonl" ]; then
  "$PY" benchmarks/client_cost.py report --json "$OUT/scaleout.jsonl" > "$OUT/report.md"
  echo; echo "== report ($OUT/report.md)"; cat "$OUT/report.md"
fi
echo "== done in $(( $(date +%s) - T0 )) s, client_cost.py exit $rc; results in $OUT"
exit "$rc"
