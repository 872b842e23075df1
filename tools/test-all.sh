#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian machine and run
# the whole suite.  Extra arguments go to pytest.
#   bash tools/test-all.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

# Debian packages the tests need (present already on most machines of this
# kind; installed only when missing).
need=()
command -v python3 >/dev/null || need+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
# ZooKeeper (standalone server started by the tests on a free loopback
# port, see tests/servers.py): Debian's package, plus a JRE if none.
if [ ! -f /usr/share/java/zookeeper.jar ]; then
  need+=(zookeeper)
  command -v java >/dev/null || need+=(default-jre-headless)
fi
if [ ${#need[@]} -gt 0 ]; then
  apt-get -o DPkg::Lock::Timeout=120 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=120 install \
    -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check -e '.[test,sql-servers]'
exec "$VENV/bin/python" -m pytest -q "$@"
