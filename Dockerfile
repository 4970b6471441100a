# Builds the single `nura` binary; `docker compose up` runs it with Postgres and NATS.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin nura

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/nura /usr/local/bin/nura
USER 65534
EXPOSE 8080
ENTRYPOINT ["nura"]
CMD ["serve"]
