#!/usr/bin/env bash
# Install Debian packages, with sudo when not root: `apt-install.sh PACKAGE...` (no-op without any).
set -euo pipefail

[ $# -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
else
    echo "apt-install: need root or sudo to apt-get install $*" >&2
    exit 1
fi
"${SUDO[@]}" apt-get update
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "$@"
