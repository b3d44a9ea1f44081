# egressvip. `make help` lists the targets.
SHELL := /bin/bash
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
GO ?= go
BIN := bin/egressvip
APT_PACKAGES := iptables nftables conntrack etcd-server iproute2
E2E_TIMEOUT ?= 50m
# make bench-scale: Service counts of the egress rounds, Services of the
# externalTrafficPolicy: Cluster run (0 skips it), further flags (go run
# ./testing/cmd/benchscale -h lists them).
BENCH_N ?= 50,500,2000
BENCH_CLUSTER ?= 50
BENCH_ARGS ?=

.PHONY: help build test test-unit test-privileged test-sandbox e2e demo bench bench-scale lint deps clean

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

build: ## build bin/egressvip
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-s -w -X main.version=$(VERSION)" -o $(BIN) ./cmd/egressvip

deps: ## install the Debian packages tests and the demo need (root)
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

test: deps test-unit test-sandbox e2e ## run every test: unit, privileged (root, in netns), the sandbox itself and end to end

test-unit: ## unit and privileged tests (privileged ones skip unless root)
	$(GO) vet ./...
	$(GO) test -race -count=1 ./...

test-privileged: deps ## only the privileged tests, failing instead of skipping
	EGRESSVIP_REQUIRE_PRIVILEGED=1 $(GO) test -race -count=1 -run 'Privileged' ./...

test-sandbox: deps ## the sandbox harness on real clusters: kube-proxy modes, helpers, a release, routed nodes (root)
	$(GO) test -tags e2e -count=1 -v -timeout 20m ./testing/sandbox/

e2e: deps ## end-to-end scenarios on the local sandbox cluster (root)
	$(GO) test -p 1 -tags e2e -count=1 -v -timeout $(E2E_TIMEOUT) ./testing/e2e/...

demo: deps ## run the product on the built-in local sandbox cluster (root)
	$(GO) run ./testing/cmd/demo

bench: ## benchmarks that print speed and memory figures
	$(GO) test -run '^$$' -bench . -benchmem ./...

bench-scale: deps ## scale figures on the sandbox (root): convergence, API requests/s, heartbeats, memory; BENCH_N=50 BENCH_ARGS='-steady 10s'
	$(GO) run ./testing/cmd/benchscale -n '$(BENCH_N)' -cluster $(BENCH_CLUSTER) $(BENCH_ARGS)

lint: ## gofmt, go vet (with e2e tag), go mod tidy check, Dockerfile lint
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); exit 1; }
	$(GO) vet ./...
	$(GO) vet -tags e2e ./...
	$(GO) mod tidy -diff
	npx --yes dockerfilelint@1.8.0 Dockerfile Dockerfile.iptables

clean: ## remove build output
	rm -rf bin
