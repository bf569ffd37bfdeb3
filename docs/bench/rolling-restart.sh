#!/bin/bash
# docs/bench/rolling-restart.sh BIN MODE(term|kill) OUT: a 3-node `raftchat local`, sends at 200/s for 12 s,
# node 2 stopped (SIGTERM) or killed (SIGKILL) 6 s in; prints the bench's step line.
BIN=$1; MODE=$2; OUT=$3
D=$(mktemp -d /tmp/roll.XXXX)
mkfifo $D/in
( tail -f /dev/null > $D/in & echo $! > $D/hold ) 
$BIN local --dir $D/c < $D/in > $D/local.log 2>&1 &
LP=$!
for i in $(seq 1 60); do grep -q "cluster is ready" $D/local.log && break; sleep 0.5; done
$BIN bench --server http://127.0.0.1:8081 --server http://127.0.0.1:8083 --secret-file $D/c/secret --rates 200 --duration 12 --quiet --out $OUT.json > $OUT.log 2>&1 &
BP=$!
sleep 6
P2=$(pgrep -f "serve --config $D/c/node2.toml")
if [ "$MODE" = kill ]; then kill -9 $P2; else kill -TERM $P2; fi
wait $BP
grep -E "^raftchat +send" $OUT.log | head -1
kill -INT $LP; sleep 8; kill $(cat $D/hold) 2>/dev/null; pkill -f "$D/c/" ; true
