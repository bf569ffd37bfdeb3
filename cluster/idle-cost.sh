#!/usr/bin/env bash
# Idle cost of a local 3-node cluster with N shards: CPU of the three node processes over
# 30 s (percent of one core) and their RSS summed, with nothing sent (docs/capacity.md).
#
#   cluster/idle-cost.sh SHARDS [HTTP_PORT_BASE] [path/to/raftchat]
set -euo pipefail
shards=${1:?shards}; port=${2:-9301}; bin=$(realpath "${3:-target/release/raftchat}")
dir=$(mktemp -d /tmp/raftchat-idle.XXXXXX)
cd "$dir"
(sleep 600 | "$bin" local --dir rl --shards "$shards" --http-port "$port" \
   --grpc-port $((port + 100)) --peer-port $((port + 200)) > local.out 2>&1 &)
for _ in $(seq 1 120); do grep -q "cluster is ready" local.out 2>/dev/null && break; sleep 1; done
grep -q "cluster is ready" local.out || { cat local.out; exit 1; }
sleep 10
pids=$(for p in $(pgrep -f "raftchat serve"); do [[ $(readlink "/proc/$p/cwd") == "$dir" ]] && echo "$p"; done | xargs)
ticks() { for p in $pids; do awk '{print $14 + $15}' "/proc/$p/stat"; done | paste -sd+ | bc; }
t0=$(ticks); sleep 30; t1=$(ticks)
rss=$(for p in $pids; do awk '/VmRSS/ {print $2}' "/proc/$p/status"; done | paste -sd+ | bc)
echo "shards=$shards nodes=$(wc -w <<<"$pids") idle_cpu_percent_of_one_core=$(echo "scale=1; ($t1 - $t0) * 100 / $(getconf CLK_TCK) / 30" | bc) rss_mb=$((rss / 1024))"
pkill -f "local --dir rl --shards $shards --http-port $port" || true
sleep 3
rm -rf "$dir"
