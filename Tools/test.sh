#!/usr/bin/env bash
# The whole test suite: unit tests and an end-to-end run of every example pipeline in pipelines/.
set -euo pipefail
cd "$(dirname "$0")/.."
./Tools/setup.sh
swift build --build-tests
swift test --skip-build --disable-xctest "$@"
