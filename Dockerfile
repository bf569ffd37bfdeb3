# raftchat's container image: a build stage and a small Debian runtime.
#
#   docker build -t raftchat .                  # the ordinary build: Rust from the rust image
#
# Machines without an image registry (like raftchat's own test machines) pass a base image
# they made from local files and a binary built outside Docker; see docs/deploy.md:
#
#   docker build --build-arg RUST_IMAGE=debian:bookworm-slim -t raftchat .   # with cluster/docker/prebuilt/raftchat
ARG RUST_IMAGE=rust:1-bookworm
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
# A binary placed in cluster/docker/prebuilt/ is used as it is; otherwise build one.
RUN if [ -x cluster/docker/prebuilt/raftchat ]; then \
      cp cluster/docker/prebuilt/raftchat /raftchat; \
    else \
      cargo build --release --locked --bin raftchat && cp target/release/raftchat /raftchat; \
    fi

FROM ${BASE_IMAGE}
RUN groupadd --system --gid 10001 raftchat \
 && useradd --system --uid 10001 --gid raftchat --home-dir /var/lib/raftchat --shell /usr/sbin/nologin raftchat \
 && mkdir -p /var/lib/raftchat /etc/raftchat \
 && chown raftchat:raftchat /var/lib/raftchat
COPY --from=build /raftchat /usr/local/bin/raftchat
USER raftchat
WORKDIR /var/lib/raftchat
VOLUME /var/lib/raftchat
# Client HTTP/WebSocket (and the page), client gRPC, peers.
EXPOSE 8080 7070 7071
# Ready = every local shard has a leader. bash's /dev/tcp: the image needs no curl.
HEALTHCHECK --interval=5s --timeout=3s --start-period=20s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8080 && printf 'GET /readyz HTTP/1.0\\r\\n\\r\\n' >&3 && head -1 <&3 | grep -q ' 200 '"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/raftchat"]
CMD ["serve", "--config", "/etc/raftchat/node.toml"]
