#!/usr/bin/env bash
# Install Debian's zookeeper package (and with it Java) unless it is already there.
set -euo pipefail

[ -f /usr/share/java/zookeeper.jar ] || bash "$(dirname "$0")/apt-install.sh" zookeeper
