#!/usr/bin/env bash
# Optional peer for `make bench`: rustic is not packaged by Debian, so it
# is built from crates.io into ~/.cache/bkp/rustic (about 10 minutes of
# both cores). The harness includes it when the binary is there.
set -euo pipefail
exec cargo install --locked rustic-rs --version 0.11.4 --root "$HOME/.cache/bkp/rustic"
