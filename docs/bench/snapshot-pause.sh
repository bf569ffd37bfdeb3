#!/usr/bin/env bash
# What a snapshot build of a large shard costs the sends that come meanwhile
# (docs/performance.md, "Snapshot builds and the shard's writes").
#
#   docs/bench/snapshot-pause.sh BIN DIR [MB]
#   NO_SNAPSHOT=1 docs/bench/snapshot-pause.sh BIN DIR [MB]    (the same load, no build)
#
# The first run in DIR starts 3 nodes (configs from `raftchat local`, one shard, no
# snapshots by policy) and fills the shard with about MB megabytes of 60 KB messages.
# Every run (re)starts the nodes on BIN in DIR, offers 200 sends/s of 100-byte texts for
# 30 s (`raftchat bench`), and 8 s in asks all three nodes for a snapshot of the shard at
# once (as the `snapshot_every` policy does: replicas reach it at about the same index).
# Prints the bench's line (the latency of every send from its intended start: a build
# that holds the shard's writes shows as the max) and each node's "built snapshot" log
# line. Run it with two builds on one DIR to compare them on the same data.
# Ports 18081-3, 17081-3, 17091-3.
set -euo pipefail
BIN=$(realpath "$1")
DIR=$2
MB=${3:-1024}
mkdir -p "$DIR"
DIR=$(realpath "$DIR")
URLS=(http://127.0.0.1:18081 http://127.0.0.1:18082 http://127.0.0.1:18083)

ready() { until curl -sf "$1/readyz" >/dev/null 2>&1; do sleep 0.5; done; }
start() {
  "$BIN" serve --config "$DIR/node$1.toml" >>"$DIR/node$1.log" 2>&1 &
  echo $! >"$DIR/node$1.pid"
}
cleanup() {
  for i in 1 2 3; do kill "$(cat "$DIR/node$i.pid" 2>/dev/null)" 2>/dev/null || true; done
  # Until they are gone (a node flushes on the way out and holds its folder's lock till then).
  for i in 1 2 3; do
    while kill -0 "$(cat "$DIR/node$i.pid" 2>/dev/null)" 2>/dev/null; do sleep 0.2; done
  done
}
trap cleanup EXIT

if [[ ! -f $DIR/filled ]]; then
  "$BIN" local --dir "$DIR" --shards 1 --http-port 18081 --grpc-port 17081 --peer-port 17091 </dev/null >"$DIR/local.out" 2>&1 &
  LOCAL=$!
  for u in "${URLS[@]}"; do ready "$u"; done
  kill -INT $LOCAL
  wait $LOCAL || true
  for i in 1 2 3; do
    sed -i '1i max_text_bytes = 65536\nmax_body_bytes = 131072\nsnapshot_every = 100000000' "$DIR/node$i.toml"
  done
  for i in 1 2 3; do start $i; done
  for u in "${URLS[@]}"; do ready "$u"; done
  RATE=150
  SECS=$((MB * 1024 / 60 / RATE + 1))
  echo "filling: ${RATE} sends/s of 60 KB for ${SECS} s"
  "$BIN" bench --server "${URLS[0]}" --server "${URLS[1]}" --server "${URLS[2]}" --secret-file "$DIR/secret" \
    --users 20 --rate $RATE --duration $SECS --text-bytes 61440 --quiet --out "$DIR/fill.json" | tail -1
  cleanup
  touch "$DIR/filled"
fi

for i in 1 2 3; do : >"$DIR/node$i.log"; start $i; done
for u in "${URLS[@]}"; do ready "$u"; done
sleep 15  # past the restart: the first seconds after a restart are slow whatever happens
TOKEN=$("$BIN" token operator --admin --secret-file "$DIR/secret")
[[ -n ${NO_SNAPSHOT:-} ]] || (
  sleep 8
  # The request waits for the snapshot and streams it back; only the trigger matters here.
  for u in "${URLS[@]}"; do
    curl -s --max-time 0.5 -H "Authorization: Bearer $TOKEN" "$u/v1/admin/shards/0/snapshot" -o /dev/null &
  done
  wait
) || true &
"$BIN" bench --server "${URLS[0]}" --server "${URLS[1]}" --server "${URLS[2]}" --secret-file "$DIR/secret" \
  --users 200 --rate 200 --duration 30 --quiet --out "$DIR/pause-$(basename "$BIN").json" | tail -3
sleep 1
for i in 1 2 3; do
  echo "node $i: $(grep -h 'built snapshot' "$DIR/node$i.log" | tail -1 | cut -c1-400)"
done
du -sh "$DIR"/node1/snapshots "$DIR"/node1/db 2>/dev/null || true
