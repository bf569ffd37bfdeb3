#!/usr/bin/env bash
# Builds raftchat's image and runs the 3-node compose cluster: it starts, chats, survives a
# `docker kill` of one container, and the killed node comes back with every message.
#
#   cluster/docker/test.sh [path/to/raftchat]    (default: target/release/raftchat, else target/debug/raftchat)
#
# Machines with no image registry: the Debian base image is made from Debian's archive with
# debootstrap and imported as debian:bookworm-slim (docs/deploy.md), and the binary built on
# the host is used instead of a Rust build stage. Needs root, docker and docker-compose.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${1:-}
if [[ -z $bin ]]; then
  if [[ -x target/release/raftchat ]]; then bin=target/release/raftchat; else bin=target/debug/raftchat; fi
fi
[[ -x $bin ]] || { echo "no raftchat binary at $bin (cargo build first)" >&2; exit 2; }
command -v docker-compose >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker-compose; }
compose() { docker-compose -p raftchat-test -f cluster/compose.yaml "$@"; }

# 1. The base image, from local files when no registry is reachable.
if ! docker image inspect debian:bookworm-slim >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap; }
  root=$(mktemp -d)
  debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >/dev/null
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | docker import - debian:bookworm-slim
  rm -rf "$root"
fi

# 2. The image, with the host's binary in place of the Rust build stage.
mkdir -p cluster/docker/prebuilt
cp "$bin" cluster/docker/prebuilt/raftchat
docker build -q --build-arg RUST_IMAGE=debian:bookworm-slim -t raftchat:local . >/dev/null

# 3. A secret every node shares, readable by the image's user only.
if [[ ! -s cluster/docker/secret ]]; then
  head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > cluster/docker/secret
fi
chown 10001:10001 cluster/docker/secret
chmod 600 cluster/docker/secret

cleanup() { compose down -v --remove-orphans >/dev/null 2>&1 || true; }
trap cleanup EXIT
cleanup
compose up -d --no-build

healthy() { [[ $(docker inspect -f '{{.State.Health.Status}}' "raftchat-test_$1_1" 2>/dev/null) == healthy ]]; }
wait_healthy() {
  for _ in $(seq 1 120); do
    local all=yes
    for n in "$@"; do healthy "$n" || all=no; done
    [[ $all == yes ]] && return 0
    sleep 1
  done
  compose ps; compose logs --tail 30; echo "not healthy: $*" >&2; return 1
}
wait_healthy node1 node2 node3
echo "compose cluster healthy"

post() { curl -fsS -X POST "$1" -H 'content-type: application/json' "${@:3}" -d "$2"; }
post http://127.0.0.1:8081/v1/accounts '{"user":"alice","password":"alice password"}' >/dev/null
post http://127.0.0.1:8082/v1/accounts '{"user":"bob","password":"bob password"}' >/dev/null
token() { post "$1/v1/sessions" "{\"user\":\"$2\",\"password\":\"$2 password\"}" | sed -E 's/.*"access_token":"([^"]+)".*/\1/'; }
A=$(token http://127.0.0.1:8081 alice)
send() { post "$1/v1/messages" "{\"to\":\"bob\",\"client_msg_id\":\"$2\",\"text\":\"$3\"}" -H "authorization: Bearer $A" >/dev/null; }
send http://127.0.0.1:8081 m1 "hello through node 1"
curl -fsS http://127.0.0.1:8083/ | grep -q '<title>raftchat</title>'

docker kill raftchat-test_node3_1 >/dev/null
echo "node3 killed"
for i in 2 3 4; do
  for _ in $(seq 1 30); do send http://127.0.0.1:8082 "m$i" "sent while node 3 is down ($i)" && break; sleep 1; done
done
docker start raftchat-test_node3_1 >/dev/null
wait_healthy node3
B=$(token http://127.0.0.1:8083 bob)
hist=$(curl -fsS "http://127.0.0.1:8083/v1/conversations/alice~bob/messages" -H "authorization: Bearer $B")
count=$(grep -o '"seq":' <<<"$hist" | wc -l)
if [[ $count != 4 ]]; then
  echo "node 3 shows $count messages after coming back, want 4: $hist" >&2
  exit 1
fi
echo "node3 back with all 4 messages; compose test passed"
