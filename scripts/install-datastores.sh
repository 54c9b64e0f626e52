#!/usr/bin/env bash
# Install Debian's redis-server and postgresql packages (for the redis and postgres pack tests) unless
# they are already there. PostgreSQL's server programs live in /usr/lib/postgresql/<major>/bin, off PATH;
# the package also creates the `postgres` user that the tests run the server as when they run as root.
set -euo pipefail

missing=()
command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1 || missing+=(redis-server)
if ! compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null \
    || ! compgen -G '/usr/lib/postgresql/*/bin/pg_verifybackup' >/dev/null; then
    missing+=(postgresql)
fi
# Where services may start, the packages start Debian's own servers (ports 6379 and 5432): the tests
# start servers of their own on free ports, so the two never meet.
bash "$(dirname "$0")/apt-install.sh" "${missing[@]}"
