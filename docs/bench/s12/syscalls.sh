#!/bin/bash
# Syscalls and log entries at one send rate: runs `raftchat bench --local` at RATE for 16 s
# and, over 5 s of the step, counts node 1's writev and fdatasync calls (perf stat) and the
# cluster's proposed log entries and commands (the nodes' raftchat_proposal_batch_size).
#   docs/bench/s12/syscalls.sh BIN OUT_PREFIX [RATE]
# Run it from a scratch folder (the cluster's data goes under the current directory).
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=$1; OUT=$2; RATE=${3:-1000}
("$BIN" bench --local --rates "$RATE" --duration 16 --quiet --out "$OUT.json" > "$OUT.log" 2>&1 &)
python3 "$HERE/batch.py" 9 5 &
sleep 9; PID=$(pgrep -f 'raftchat serve' | head -1)
perf stat -e 'syscalls:sys_enter_writev,syscalls:sys_enter_fdatasync' -p "$PID" -- sleep 5 2>&1 |
  awk '$1+0>0 && $2 ~ /sys/ {sub("syscalls:sys_enter_","",$2); printf "%s=%d/s ", $2, $1/5}'
sleep 9
python3 -c "
import json; s=json.load(open('$OUT.json'))['steps'][0]; print('| achieved', s['achieved_per_s'], 'p50', s['p50_ms'], 'p99', s['p99_ms'])"
