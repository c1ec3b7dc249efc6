#!/usr/bin/env bash
# Builds in release mode and runs the benchmark (Tools/bench/main.swift). `--quick` for a short run;
# `--twin` for the twin comparator and `--intake` for the continuity intake, against their Python
# peers (set up by Tools/peers.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
./Tools/setup.sh
swift build -c release --product pipehost
swift build -c release --product bench
if [[ " $* " == *" --twin "* || " $* " == *" --intake "* || " $* " == *" --cap "* ]]; then ./Tools/peers.sh || echo "bench: peer baseline not installed; using the documented figure" >&2; fi
exec .build/release/bench "$@"
