#!/bin/bash
# CPU per send: runs `raftchat bench --local` at one rate while cpusample.py sums the CPU
# time of the three `raftchat serve` processes every second, then prints the median cores
# used over the steady seconds and the CPU per acknowledged send.
#   docs/bench/cpu-per-send.sh BIN RATE DURATION OUT_PREFIX
# BIN must be a file named `raftchat` (cpusample.py finds the processes by name). Run it
# from a scratch folder: the cluster's data goes under the current directory. Extra bench
# arguments come from BENCH_ARGS, e.g. BENCH_ARGS="--set cluster_version=6".
set -euo pipefail
BIN=$1; RATE=$2; DUR=$3; OUT=$4
HERE=$(cd "$(dirname "$0")" && pwd)
python3 "$HERE/cpusample.py" "$OUT.samples" & SP=$!
# shellcheck disable=SC2086
"$BIN" bench --local --rates "$RATE" --duration "$DUR" --quiet --out "$OUT.json" ${BENCH_ARGS:-} > "$OUT.log" 2>&1 || true
kill $SP
python3 - "$OUT" <<'PY'
import json, statistics, sys
o = sys.argv[1]
s = [list(map(float, l.split())) for l in open(o + '.samples')]
d = [(s[i + 1][1] - s[i][1]) / (s[i + 1][0] - s[i][0]) for i in range(len(s) - 1)]
g = [(s[i + 1][2] - s[i][2]) / (s[i + 1][0] - s[i][0]) for i in range(len(s) - 1)]
high = [i for i, x in enumerate(d) if x > 0.6 * max(d)]
w = high[2:-1]  # the load step, without its first two seconds and its last
cores = statistics.median(d[i] for i in w)
gen = statistics.median(g[i] for i in w)
st = json.load(open(o + '.json'))['steps'][0]
print(f"{o}: achieved {st['achieved_per_s']:.0f} refused {st['refused']} p50 {st['p50_ms']:.1f} "
      f"p99 {st['p99_ms']:.1f} | nodes {cores:.2f} cores, generator {gen:.2f} | "
      f"{1000 * cores / st['achieved_per_s']:.3f} ms CPU per send ({len(w)} s)")
PY
