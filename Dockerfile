# syntax=docker/dockerfile:1
# Multi-stage: build the release binary, then ship it on a slim Debian.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && mkdir -p web/static sql \
    && cargo build --release --bin eventgate 2>/dev/null || true
COPY sql sql
COPY web web
COPY src src
RUN touch src/main.rs src/lib.rs && cargo build --release --bin eventgate

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 eventgate
COPY --from=build /src/target/release/eventgate /usr/local/bin/eventgate
USER eventgate
ENV EVENTGATE_LISTEN=0.0.0.0:8080 RUST_LOG=info
EXPOSE 8080
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/eventgate"]
CMD ["serve"]
