#!/usr/bin/env bash
# Regenerates the generated part of docs/pipeline-reference.md (everything from the first stage
# heading on) from the stage registry. The Docs test fails when it is stale.
set -euo pipefail
cd "$(dirname "$0")/.."
swift build --product pipectl >/dev/null
doc=docs/pipeline-reference.md
marker='## Stage kinds'
# Everything up to and including the "## Stage kinds" heading and the blank line after it stays.
head -n "$(($(grep -nxF "$marker" "$doc" | head -1 | cut -d: -f1) + 1))" "$doc" > "$doc.tmp"
.build/debug/pipectl stages --markdown >> "$doc.tmp"
mv "$doc.tmp" "$doc"
