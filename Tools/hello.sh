#!/usr/bin/env bash
# The main job: set up, build, and run pipelines/hello.yaml (generator -> passthrough -> JSONL
# file sink), printing the per-stage and per-lane summary. Needs nothing else running.
set -euo pipefail
cd "$(dirname "$0")/.."
./Tools/setup.sh
swift build -c release --product pipehost
exec .build/release/pipehost run pipelines/hello.yaml "$@"
