#!/usr/bin/env bash
# A seeded randomized fault run against the cluster on a test network of network namespaces
# (crates/ringmoe-chaos/src/main.rs says what it does and checks):
#   scripts/chaos.sh [--minutes M] [--seed S] [--json]
# Exit 0 only if no acknowledged job was lost, duplicated or wrong. Needs root and iproute2
# (scripts/test.sh installs it). Builds with the test profile, so after `scripts/test.sh` the
# binaries are already there.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --profile test --locked --quiet -p ringmoe -p ringmoe-chaos --bin ringmoe --bin ringmoe-chaos
exec target/debug/ringmoe-chaos --bin target/debug/ringmoe "$@"
