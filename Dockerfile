# egressvip: a static binary on a minimal base. Egress SNAT needs iptables:
# use Dockerfile.iptables for that image.
FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/egressvip ./cmd/egressvip

# A static binary needs no base image; the API server's CA comes from the
# ServiceAccount mount. Runs as root on purpose: the DaemonSet drops every
# capability but NET_ADMIN and NET_RAW, which only root's effective set uses.
FROM scratch
COPY --from=build /out/egressvip /egressvip
ENTRYPOINT ["/egressvip"]
CMD ["run"]
