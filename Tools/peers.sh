#!/usr/bin/env bash
# Sets up the peer baselines (../shared/peer-bench: the Python packages our stages grow from) in
# .build/peers-venv, from PyPI, so that Tools/bench can print ratios measured in the same run.
# Without network or without ../shared/peer-bench the benchmark falls back to documented figures.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.build/peers-venv
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import tibet_twin, tibet_continuityd.daemon, tibet_drop.bundle" 2>/dev/null; then exit 0; fi
python3 -m venv "$venv"
"$venv/bin/pip" install -q tibet-core==0.5.0 typer cbor2
# tibet-continuityd's daemon imports tibet_drop (verify_fork) on every arrival; tibet_drop needs
# cryptography (prebuilt wheel, with cffi/pycparser).
"$venv/bin/pip" install -q --only-binary=:all: cryptography
"$venv/bin/pip" install -q --no-deps tibet-cap-bus==0.1.6 tibet-twin==0.1.1
"$venv/bin/pip" install -q --no-deps tibet-continuityd==0.5.6 tibet-drop==0.3.4
