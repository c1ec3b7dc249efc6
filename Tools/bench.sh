#!/usr/bin/env bash
# Builds in release mode and runs the benchmark (Tools/bench/main.swift). `--quick` for a short run.
set -euo pipefail
cd "$(dirname "$0")/.."
./Tools/setup.sh
swift build -c release --product pipehost
swift build -c release --product bench
exec .build/release/bench "$@"
