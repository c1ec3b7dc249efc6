#!/usr/bin/env bash
# Installs the system packages the project needs, only when some are missing.
set -euo pipefail
pkgs=(libzmq3-dev libsodium-dev libmagic-dev libsqlite3-dev libssl-dev pkg-config python3-zmq python3-jsonschema python3-yaml python3-prometheus-client binutils)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update
  $SUDO apt-get install -y "${missing[@]}"
fi
command -v swift >/dev/null || { echo "setup: swift is not on PATH (Swift 6.3 is required)" >&2; exit 1; }
