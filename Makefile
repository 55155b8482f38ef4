# Two commands do everything on a fresh Debian machine with Rust:
#   make demo   build, start a throwaway server, back up and restore, check
#   make test   the whole test suite (installs PostgreSQL for its tests),
#               then builds the Debian packages and installs, checks and
#               purges them on this machine (scripts/test-deb.sh, root)
#   make deb    bkp-server and bkp .deb packages in $(CARGO_TARGET_DIR)/debian/
#               (cargo-deb, installed once if missing; units, man pages,
#               completions, maintainer scripts: packaging/)
#   make bench  bkp against restic and borg on real data (docs/BENCH.md)
#   make lint   rustfmt --check and clippy -D warnings (release profile, so
#               RocksDB is not compiled a second time); part of `make test`
#
# Builds go to a target directory outside the clone so that CI runs on the
# same machine reuse RocksDB's compiled C++ (15-25 minutes from nothing).
export CARGO_TARGET_DIR ?= $(HOME)/.cache/bkp/target
CARGO ?= cargo

.PHONY: build demo test lint deb bench bench-scaling bench-micro bench-sync bench-fleet bench-rss bench-gc fuzz fmt clean-cache

build:
	scripts/install-deps.sh build
	$(CARGO) build --release --workspace --bins

demo: build
	scripts/demo.sh

test: build lint
	scripts/install-deps.sh test
	$(CARGO) test --release --workspace
	$(MAKE) deb
	scripts/test-deb.sh

lint:
	rustup component add clippy rustfmt 2>/dev/null || true
	$(CARGO) fmt --all --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

deb: build
	scripts/install-deps.sh deb
	scripts/build-deb.sh

# The data (linux-source tree, pgbench dumps, ~6 GB with the scaling
# dumps) is prepared once in ~/.cache/bkp/bench-data and reused.
# BENCH_RUNS=1 is the quick mode; results go to bench-data/results/.
BENCH_RUNS ?= 3
bench: build
	scripts/install-deps.sh bench
	scripts/bench/prepare.py
	BENCH_RUNS=$(BENCH_RUNS) scripts/bench/run.py

# Push and restore time against input size and store fullness (bkp only;
# BENCH_SCALING_TOOLS=bkp,restic,borg adds the peers).
bench-scaling: build
	scripts/install-deps.sh bench
	scripts/bench/prepare.py --scaling
	BENCH_RUNS=$(BENCH_RUNS) scripts/bench/scaling.py

# A second site: bkp push to one server, then bkp-server sync to another,
# against restic backup + restic copy, on dump1 and on tree1.
bench-sync: build
	scripts/install-deps.sh bench
	scripts/bench/prepare.py
	scripts/bench/sync.py --data $(HOME)/.cache/bkp/bench-data/dump1.sql
	scripts/bench/sync.py --data $(HOME)/.cache/bkp/bench-data/tree1

# One server, a store prefilled to 1x, 10x and 100x the bench data's chunk
# count (the top at least 20 M chunks), 1, 4 and 16 hosts pushing and
# restoring at once while a GC and a verify slice run (docs/BENCH.md).
# Sizes from BENCH_FLEET_* (scripts/bench/fleet.py); a quick run:
#   make bench-fleet BENCH_FLEET_CHUNKS=20000,200000 BENCH_FLEET_HOSTS=1,4 BENCH_FLEET_HOST_MB=16
bench-fleet: build
	scripts/install-deps.sh bench
	scripts/bench/prepare.py
	scripts/bench/fleet.py

# Client peak RSS on a 4 GB file of random bytes and on a tree of 2 M
# empty files (generated under ~/.cache/bkp, deleted afterwards).
bench-rss: build
	scripts/bench/rss.py

# Criterion microbenchmarks: pipeline stages, the chunk store with
# millions of chunks, loopback end to end.
bench-micro: build
	$(CARGO) bench -p bkp-benches

# What a GC rewrites against store size and garbage (a measurement:
# bytes, not time). BKP_GC_BENCH_MB (1024) of chunk data in a temp dir
# under BKP_GC_BENCH_DIR (the current directory).
bench-gc: build
	$(CARGO) bench -p bkp-benches --bench gc_cost

# Every cargo-fuzz target in fuzz/ for FUZZ_SECONDS each (not in CI).
# cargo-fuzz's default (address) sanitizer needs a nightly compiler; where
# only stable is installed,
#   make fuzz FUZZ_TOOLCHAIN= FUZZ_FLAGS="--sanitizer none" RUSTC_BOOTSTRAP=1
# still runs libFuzzer, 5-10x faster (it catches panics, not memory errors:
# the decoders are safe Rust). Crashes land in fuzz/artifacts/TARGET/; builds go to
# a target directory of their own (other flags than the main build's).
FUZZ_SECONDS ?= 120
FUZZ_TOOLCHAIN ?= +nightly
FUZZ_FLAGS ?=
fuzz:
	command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	cd fuzz && export CARGO_TARGET_DIR=$(CARGO_TARGET_DIR)-fuzz && for t in $$($(CARGO) $(FUZZ_TOOLCHAIN) fuzz list); do \
		echo "== fuzz $$t for $(FUZZ_SECONDS) s"; \
		$(CARGO) $(FUZZ_TOOLCHAIN) fuzz run $(FUZZ_FLAGS) $$t -- -max_total_time=$(FUZZ_SECONDS) || exit 1; \
	done

fmt:
	$(CARGO) fmt --all

clean-cache:
	rm -rf $(CARGO_TARGET_DIR)
