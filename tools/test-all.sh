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
# libvirt-python (the libvirt driver's tests) compiles against libvirt when
# pip installs it.
pkg-config --exists libvirt 2>/dev/null || need+=(libvirt-dev pkg-config)
command -v gcc >/dev/null || need+=(gcc)
python3 -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  2>/dev/null || need+=(python3-dev)
# The libvirt lab (tools/libvirt-lab/lab.sh, started by the lab tests): two
# private libvirtd daemons and QEMU; its guest is built with a static C
# program, cpio and Debian's kernel package (apt-get download needs the
# package lists).
# QEMU 9.0 or newer: before it, TCG's dirty-page tracking misses stores
# made through the TCG TLB after each pass of a live migration's copy (fixed
# upstream in 9.0: "system/physmem: Fix migration dirty bitmap coherency with
# TCG memory access"), so a guest moved by a long copy arrives with stale
# memory and crashes.  Debian 12 has 7.2; its bookworm-backports has 10.
qemu=()
qemu_major=$(qemu-system-x86_64 --version 2>/dev/null \
  | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p')
if [ "${qemu_major:-0}" -lt 9 ]; then
  qemu=(qemu-system-x86)
  if grep -qx 'VERSION_CODENAME=bookworm' /etc/os-release 2>/dev/null; then
    qemu=(-t bookworm-backports qemu-system-x86)
    grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/ \
      || printf '%s\n' 'Types: deb' 'URIs: http://deb.debian.org/debian' \
        'Suites: bookworm-backports' 'Components: main' \
        'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' \
        > /etc/apt/sources.list.d/bookworm-backports.sources
  fi
fi
[ -x /usr/sbin/libvirtd ] || need+=(libvirt-daemon-system)
command -v virsh >/dev/null || need+=(libvirt-clients)
[ -f "$(gcc -print-file-name=libc.a 2>/dev/null)" ] || need+=(libc6-dev)
command -v cpio >/dev/null || need+=(cpio)
update=
apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1 || update=1
if [ ${#need[@]} -gt 0 ] || [ ${#qemu[@]} -gt 0 ] || [ -n "$update" ]; then
  apt-get -o DPkg::Lock::Timeout=120 update -qq
fi
install() {
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=120 install \
    -y -qq --no-install-recommends "$@" >/dev/null
}
[ ${#need[@]} -eq 0 ] || install "${need[@]}"
[ ${#qemu[@]} -eq 0 ] || install "${qemu[@]}"   # apart: only QEMU from backports

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check -e '.[test,sql-servers]'
exec "$VENV/bin/python" -m pytest -q "$@"
