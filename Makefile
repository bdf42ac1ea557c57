# starling — build, test, demo and benchmarks.
# Every target that needs system parts installs them first (hack/install-deps.sh).

GO        ?= go
BIN       := bin
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -X github.com/starling-dev/starling/internal/version.Version=$(VERSION)
CMDS      := starling starlingd starling-scheduler
# Packages whose state is shared between goroutines; they run again under -race.
RACE_PKGS ?= $(shell $(GO) list ./pkg/... ./cmd/... 2>/dev/null)
# Fuzz targets (package:target); make test runs each for FUZZ_SHORT, make fuzz for FUZZTIME.
FUZZ_TARGETS ?= ./pkg/toc:FuzzBuild ./pkg/toc:FuzzLoad ./pkg/toc:FuzzEntries \
	./pkg/scheduler:FuzzSchedulerAPI ./pkg/piece:FuzzPieceProtocol ./pkg/proxy:FuzzProxyRequest ./pkg/proxy:FuzzParseRange
FUZZ_SHORT ?= 10s
FUZZTIME ?= 5m
TEST_TIMEOUT ?= 75m
STATICCHECK ?= $(shell command -v staticcheck 2>/dev/null || echo $(HOME)/go/bin/staticcheck)

.PHONY: all build test unit race fuzz lint deps demo bench-convert bench-lazy bench-p2p bench-lazy-p2p proto clean test-stargz

all: build

build:
	@mkdir -p $(BIN)
	$(GO) build -ldflags '$(LDFLAGS)' -o $(BIN)/ $(addprefix ./cmd/,$(CMDS))

deps:
	@./hack/install-deps.sh

# The whole suite: unit tests, then integration tests against a real registry,
# containerd, runc, FUSE and network namespaces that the tests start themselves.
test: deps build
	STARLING_BIN=$(CURDIR)/$(BIN) $(GO) test -count=1 -timeout $(TEST_TIMEOUT) ./...
	STARLING_BIN=$(CURDIR)/$(BIN) $(GO) test -race -count=1 -timeout $(TEST_TIMEOUT) $(RACE_PKGS)
	cd test/stargz && STARLING_BIN=$(CURDIR)/$(BIN) $(GO) test -count=1 -timeout 20m ./...
	@$(MAKE) --no-print-directory fuzz FUZZTIME=$(FUZZ_SHORT)

# The real stargz-snapshotter, built from its Go module in test/stargz (a
# module of its own, so the main one does not carry its dependencies), with
# its registry mirror pointed at starlingd as Dragonfly's users configure it.
test-stargz: deps build
	cd test/stargz && STARLING_BIN=$(CURDIR)/$(BIN) $(GO) test -count=1 -timeout 20m -v ./...

unit:
	$(GO) test -count=1 -short ./...

race:
	$(GO) test -race -count=1 $(RACE_PKGS)

# Each fuzz target for FUZZTIME (go test fuzzes one target at a time).
fuzz:
	@set -e; for t in $(FUZZ_TARGETS); do \
		pkg=$${t%%:*}; fn=$${t##*:}; \
		echo "fuzz $$pkg $$fn for $(FUZZTIME)"; \
		$(GO) test -run '^$$' -fuzz "^$$fn\$$" -fuzztime $(FUZZTIME) $$pkg; \
	done

lint:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt: files above need formatting"; exit 1; }
	$(GO) vet ./...
	$(GO) vet -tags bench ./test/...
	@test -x "$(STATICCHECK)" || $(GO) install honnef.co/go/tools/cmd/staticcheck@latest
	$(STATICCHECK) ./...

demo: deps build
	@./hack/demo.sh

bench-convert: deps build
	@./hack/bench-convert.sh

bench-lazy: deps build
	@./hack/bench-lazy.sh

bench-p2p: deps build
	@./hack/bench-p2p.sh

bench-lazy-p2p: deps build
	@./hack/bench-lazy-p2p.sh

proto:
	protoc --go_out=. --go_opt=paths=source_relative \
	       --go-grpc_out=. --go-grpc_opt=paths=source_relative \
	       api/schedulerpb/scheduler.proto

clean:
	rm -rf $(BIN)
