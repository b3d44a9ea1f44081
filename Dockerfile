# egressvip with nft for the nftables SNAT backend (egress_backend=auto picks
# it where nft works). Use Dockerfile.iptables for the iptables backends too.
FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/egressvip ./cmd/egressvip

# knftables runs the nft binary: Debian 12 ships nftables 1.0.6, no newer
# than most hosts' nft, as knftables recommends. Runs as root on
# purpose: the DaemonSet drops every capability but NET_ADMIN and NET_RAW,
# which only root's effective set uses.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends nftables \
    && rm -rf /var/lib/apt/lists/* \
    && nft --version
COPY --from=build /out/egressvip /egressvip
ENTRYPOINT ["/egressvip"]
CMD ["run"]
