# tailgate: multi-stage build, small non-root runtime image.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p tailgate --bin tailgate \
 && strip target/release/tailgate

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates zlib1g \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/tailgate --create-home tailgate
COPY --from=build /src/target/release/tailgate /usr/local/bin/tailgate
USER tailgate
WORKDIR /var/lib/tailgate
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/tailgate"]
CMD ["run", "--config", "/etc/tailgate/tailgate.toml"]
