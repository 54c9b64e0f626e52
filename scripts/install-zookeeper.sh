#!/usr/bin/env bash
# Install Debian's zookeeper package (and with it Java) unless it is already there.
set -euo pipefail

if [ -f /usr/share/java/zookeeper.jar ]; then
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
else
    echo "install-zookeeper: need root or sudo to apt-get install zookeeper" >&2
    exit 1
fi

"${SUDO[@]}" apt-get update
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y zookeeper
