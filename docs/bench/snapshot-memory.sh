#!/usr/bin/env bash
# A node's memory while it catches up on a large shard by snapshot (docs/performance.md,
# "Snapshots"), plus the backup time of that shard and the time to restore that backup
# into a new 3-node cluster (ports 18181-3, 17181-3, 17191-3).
#
#   docs/bench/snapshot-memory.sh BIN DIR [MB]
#   EXTRA='sled_cache_bytes = 67108864' docs/bench/snapshot-memory.sh BIN DIR [MB]
#
# (EXTRA: config lines added to every node's file.)
# Starts 3 nodes (configs from `raftchat local`, one shard), fills the shard with about MB
# megabytes of 60 KB messages through `raftchat bench`, stopping node 3 halfway through,
# backs the cluster up, snapshots the shard on nodes 1 and 2 (each purges its log up to 10
# entries behind), then restarts node 3: it can only catch up by installing the
# whole shard's snapshot. Prints node 3's peak RSS (VmHWM), nodes 1 and 2's highest RSS
# seen while the leader sends, and the times. Ports 18081-3, 17081-3, 17091-3.
# (Wiping node 3's data instead would not work: openraft 0.9 does not let a follower's log
# go backwards; a node with lost data rejoins through a membership change, not built yet.)
set -euo pipefail
BIN=$(realpath "$1")
DIR=$2
MB=${3:-1024}
rm -rf "$DIR"
mkdir -p "$DIR"
DIR=$(realpath "$DIR")
URLS=(http://127.0.0.1:18081 http://127.0.0.1:18082 http://127.0.0.1:18083)

ready() { until curl -sf "$1/readyz" >/dev/null 2>&1; do sleep 0.5; done; }

# Configs (and the secret) from `raftchat local`, then stop it.
"$BIN" local --dir "$DIR" --shards 1 --http-port 18081 --grpc-port 17081 --peer-port 17091 </dev/null >"$DIR/local.out" 2>&1 &
LOCAL=$!
for u in "${URLS[@]}"; do ready "$u"; done
kill -INT $LOCAL
wait $LOCAL || true
for i in 1 2 3; do
  sed -i '1i max_text_bytes = 65536\nmax_body_bytes = 131072\nsnapshot_every = 10000000\nkeep_logs = 10' "$DIR/node$i.toml"
  if [[ -n ${EXTRA:-} ]]; then
    printf '%s\n' "$EXTRA" | cat - "$DIR/node$i.toml" >"$DIR/node$i.toml.new"
    mv "$DIR/node$i.toml.new" "$DIR/node$i.toml"
  fi
done

start() {
  "$BIN" serve --config "$DIR/node$1.toml" >>"$DIR/node$1.log" 2>&1 &
  echo $! >"$DIR/node$1.pid"
}
cleanup() { for i in 1 2 3; do kill "$(cat "$DIR/node$i.pid" 2>/dev/null)" 2>/dev/null || true; done; }
trap cleanup EXIT
for i in 1 2 3; do start $i; done
for u in "${URLS[@]}"; do ready "$u"; done

RATE=150
SECS=$((MB * 1024 / 60 / RATE + 1))
echo "filling: ${RATE} sends/s of 60 KB for ${SECS} s; node 3 stops halfway"
( sleep $((SECS / 2)); kill -9 "$(cat "$DIR/node3.pid")" ) &
STOPPER=$!
"$BIN" bench --server "${URLS[0]}" --server "${URLS[1]}" --secret-file "$DIR/secret" \
  --users 20 --rate $RATE --duration $SECS --text-bytes 61440 --quiet --out "$DIR/fill.json" | tail -1
wait $STOPPER

echo "backup (snapshots the shard, purges its log):"
/usr/bin/time -f "backup: %e s wall, client max RSS %M KB" \
  "$BIN" admin backup "$DIR/backup" --server "${URLS[0]}" --secret-file "$DIR/secret"
ls -l "$DIR"/node1/snapshots/s0/ 2>/dev/null || echo "(no snapshot files: a build that keeps snapshots in sled)"
# The backup snapshots each shard on one replica; snapshot it on the other running one
# too, so that whichever leads has purged its log past node 3's last entry.
TOKEN=$("$BIN" token operator --admin --secret-file "$DIR/secret")
for u in "${URLS[0]}" "${URLS[1]}"; do
  curl -sf -H "Authorization: Bearer $TOKEN" "$u/v1/admin/shards/0/snapshot" -o /dev/null
done
for u in "${URLS[0]}" "${URLS[1]}"; do
  curl -s "$u/status" | python3 -c 'import json,sys; d=json.load(sys.stdin); s=d["shards"][0]; print("node", d["node"], s["state"], "applied", s["applied_index"], "purged", s["purged_index"])'
done

PID1=$(cat "$DIR/node1.pid")
PID2=$(cat "$DIR/node2.pid")
echo "before the catch-up: node 1 $(grep VmRSS /proc/$PID1/status | tr -s ' \t' ' '), node 2 $(grep VmRSS /proc/$PID2/status | tr -s ' \t' ' ')"
T0=$(date +%s.%N)
start 3
PID3=$(cat "$DIR/node3.pid")
TARGET=$(curl -s "${URLS[0]}/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["shards"][0]["applied_index"])')
MAX1=0
MAX2=0
while :; do
  r=$(awk '/VmRSS/ {print $2}' /proc/$PID1/status)
  ((r > MAX1)) && MAX1=$r
  r=$(awk '/VmRSS/ {print $2}' /proc/$PID2/status)
  ((r > MAX2)) && MAX2=$r
  got=$(curl -s "${URLS[2]}/status" 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["shards"][0]["applied_index"] or 0)' 2>/dev/null || echo 0)
  [[ ${got:-0} -ge $TARGET ]] && break
  sleep 0.2
done
T1=$(date +%s.%N)
echo "node 3 caught up to index $TARGET by snapshot in $(python3 -c "print(round($T1 - $T0, 1))") s"
echo "node 3 (the new replica): $(grep -E 'VmHWM|VmRSS' /proc/$PID3/status | tr -s ' \n' ' ')"
echo "highest RSS seen during the catch-up: node 1 $MAX1 kB, node 2 $MAX2 kB (one of them leads and sends)"
grep -h "installed snapshot" "$DIR/node3.log" | tail -1 || echo "node 3 did not install a snapshot"
du -sh "$DIR"/node*/snapshots "$DIR"/node*/db 2>/dev/null || true

# Restore: the backup into a new, empty 3-node cluster of the same shard count, timed.
cleanup
R="$DIR/restored"
"$BIN" local --dir "$R" --shards 1 --http-port 18181 --grpc-port 17181 --peer-port 17191 </dev/null >"$DIR/restored.out" 2>&1 &
RLOCAL=$!
for p in 18181 18182 18183; do ready "http://127.0.0.1:$p"; done
du -sh "$DIR/backup"
/usr/bin/time -f "restore: %e s wall, client max RSS %M KB" \
  "$BIN" admin restore "$DIR/backup" --server http://127.0.0.1:18181 --secret-file "$R/secret" | tail -3
for p in 18181 18182 18183; do
  curl -s "http://127.0.0.1:$p/status" | python3 -c 'import json,sys; d=json.load(sys.stdin); s=d["shards"][0]; print("restored node", d["node"], s["state"], "applied", s["applied_index"])'
done
kill -INT $RLOCAL
wait $RLOCAL || true
