#!/usr/bin/env bash
# A real libvirt + QEMU (TCG) lab on one Debian 12 machine, as root, without
# systemd: private libvirtd daemons ("hosts"), each in its own mount namespace
# with its own state directories and host UUID, listening on a loopback TCP
# port; guests boot a Debian kernel with a busybox initramfs.
#
#   lab.sh guest CACHE_DIR
#       Build (once; kept in CACHE_DIR) the guest: CACHE_DIR/vmlinuz from
#       Debian's cloud kernel package, CACHE_DIR/initrd.gz with busybox and
#       "dirty", a program dirtying guest memory.  The guest's /init prints
#       "GUEST UP" then "tick N" every second on ttyS0; with mf_name=dirty*
#       on the kernel command line it first starts dirtying 64 MiB.
#   lab.sh start LAB_DIR NAME TCP_PORT HOST_UUID MIGRATION_PORT_MIN [CACHE_DIR]
#       Start host NAME (state in LAB_DIR/NAME); prints libvirtd's pid once
#       qemu+tcp://127.0.0.1:TCP_PORT/system answers.  With CACHE_DIR, the
#       daemon's probe of QEMU's capabilities (8 s under TCG) is done once
#       and kept in CACHE_DIR/qemu-capabilities for the next daemons (libvirt
#       probes again when the cached result does not match this machine).
#   lab.sh stop LAB_DIR NAME
#       Destroy and undefine every domain of NAME (QEMU outlives libvirtd),
#       then stop its libvirtd by pid; any QEMU left is stopped by pid too.
#
# Needs: qemu-system-x86 (QEMU 9.0 or newer: 7.2's TCG loses guest writes
# during a live migration's copy; bookworm-backports has 10 for Debian 12)
# libvirt-daemon-system libvirt-clients gcc libc6-dev cpio (tools/test-all.sh
# installs them).
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"   # libvirtd

die() { echo "lab.sh: $*" >&2; exit 1; }
uri() { echo "qemu+tcp://127.0.0.1:$1/system"; }

build_guest() {
  local cache=$1 work
  mkdir -p "$cache"
  [ -s "$cache/vmlinuz" ] && [ -s "$cache/initrd.gz" ] && return 0
  work=$(mktemp -d "$cache/build.XXXXXX")
  trap 'rm -rf "$work"' RETURN
  local kpkg
  kpkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
  [ -n "$kpkg" ] || die "no linux-image-cloud-amd64 package known to apt (apt-get update?)"
  (cd "$work" && apt-get download -q -o APT::Sandbox::User=root "$kpkg" busybox-static >/dev/null) \
    || die "apt-get download $kpkg busybox-static failed"
  dpkg-deb -x "$work/${kpkg}"_*.deb "$work/kernel"
  dpkg-deb -x "$work"/busybox-static_*.deb "$work/busybox"
  cat > "$work/dirty.c" <<'EOC'
/* dirty MB: write one byte in every page of MB MiB, forever (never converges) */
#include <stdlib.h>
int main(int c, char **v) {
  size_t n = (size_t)(c > 1 ? atol(v[1]) : 64) << 20, i;
  volatile unsigned char *p = malloc(n);
  for (unsigned char x = 1;; x++)
    for (i = 0; i < n; i += 4096) p[i] = x;
}
EOC
  gcc -O2 -static -o "$work/dirty" "$work/dirty.c"
  mkdir -p "$work/root"/{bin,proc,sys,dev}
  cp "$work/busybox/bin/busybox" "$work/dirty" "$work/root/bin/"
  cat > "$work/root/init" <<'EOC'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev 2>/dev/null
echo "GUEST UP"
for a in $(cat /proc/cmdline); do case $a in mf_name=dirty*) /bin/dirty 64 & ;; esac; done
i=0; while true; do i=$((i+1)); echo "tick $i"; sleep 1; done
EOC
  chmod +x "$work/root/init"
  (cd "$work/root" && find . | cpio -o -H newc 2>/dev/null | gzip -1 > "$work/initrd.gz")
  cp "$work/kernel"/boot/vmlinuz-* "$cache/vmlinuz.tmp" && mv "$cache/vmlinuz.tmp" "$cache/vmlinuz"
  mv "$work/initrd.gz" "$cache/initrd.gz"
}

start_host() {
  local lab=$1 name=$2 port=$3 host_uuid=$4 mig_min=$5 cache=${6:-}
  local b=$lab/$name
  mkdir -p "$b"/{sock,run,lib,log,cache} /run/libvirt /var/lib/libvirt /var/log/libvirt \
    /var/cache/libvirt
  if [ -n "$cache" ] && [ -d "$cache/qemu-capabilities" ]; then
    mkdir -p "$b/cache/qemu/capabilities"
    cp "$cache"/qemu-capabilities/*.xml "$b/cache/qemu/capabilities/" 2>/dev/null || true
  fi
  [ -d "$b/etc" ] || cp -a /etc/libvirt "$b/etc"
  [ -d "$b/lib/qemu" ] || cp -a /var/lib/libvirt/. "$b/lib/"
  # no autostarted networks: they would make bridges in the machine's network
  rm -f "$b"/etc/qemu/networks/autostart/*.xml
  cat > "$b/etc/libvirtd.conf" <<EOF
listen_tls = 0
listen_tcp = 1
listen_addr = "127.0.0.1"
tcp_port = "$port"
auth_tcp = "none"
unix_sock_dir = "$b/sock"
unix_sock_rw_perms = "0777"
auth_unix_rw = "none"
auth_unix_ro = "none"
host_uuid = "$host_uuid"
log_outputs = "3:file:$b/libvirtd.log"
EOF
  cat > "$b/etc/qemu.conf" <<EOF
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
stdio_handler = "file"
namespaces = [ ]
migration_port_min = $mig_min
migration_port_max = $((mig_min + 15))
EOF
  unshare --mount --propagation private bash -c "
    mount --bind '$b/run' /run/libvirt; mount --bind '$b/lib' /var/lib/libvirt
    mount --bind '$b/log' /var/log/libvirt; mount --bind '$b/cache' /var/cache/libvirt
    mount --bind '$b/etc' /etc/libvirt
    exec libvirtd --listen -f /etc/libvirt/libvirtd.conf -p /run/libvirt/libvirtd.pid" \
    > "$b/daemon.out" 2>&1 < /dev/null &
  local pid=$!
  echo "$pid" > "$b/daemon.pid"
  for _ in $(seq 200); do
    if virsh -q -c "$(uri "$port")" uri >/dev/null 2>&1; then
      echo "$port" > "$b/daemon.port"
      if [ -n "$cache" ]; then
        virsh -q -c "$(uri "$port")" capabilities >/dev/null
        mkdir -p "$cache/qemu-capabilities"
        cp "$b"/cache/qemu/capabilities/*.xml "$cache/qemu-capabilities/" 2>/dev/null || true
      fi
      echo "$pid"
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.05
  done
  kill "$pid" 2>/dev/null || true
  die "libvirtd $name did not answer on $(uri "$port"): $(tail -5 "$b/daemon.out" "$b/libvirtd.log" 2>/dev/null)"
}

stop_host() {
  local b=$1/$2 pid port dom qpid
  [ -f "$b/daemon.pid" ] || return 0
  pid=$(cat "$b/daemon.pid")
  port=$(cat "$b/daemon.port" 2>/dev/null || true)
  if [ -n "$port" ] && kill -0 "$pid" 2>/dev/null; then
    for dom in $(virsh -q -c "$(uri "$port")" list --all --uuid 2>/dev/null); do
      virsh -q -c "$(uri "$port")" destroy "$dom" >/dev/null 2>&1 || true
      virsh -q -c "$(uri "$port")" undefine "$dom" >/dev/null 2>&1 || true
    done
  fi
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  for qpid in "$b"/run/qemu/*.pid; do          # guests of a daemon that died first
    [ -f "$qpid" ] && kill -KILL "$(cat "$qpid")" 2>/dev/null || true
  done
  rm -f "$b/daemon.pid"
}

case "${1:-}" in
  guest) [ $# -eq 2 ] || die "usage: lab.sh guest CACHE_DIR"; build_guest "$2" ;;
  start) [ $# -ge 6 ] || die "usage: lab.sh start LAB_DIR NAME TCP_PORT HOST_UUID MIGRATION_PORT_MIN [CACHE_DIR]"
         start_host "$2" "$3" "$4" "$5" "$6" "${7:-}" ;;
  stop) [ $# -eq 3 ] || die "usage: lab.sh stop LAB_DIR NAME"; stop_host "$2" "$3" ;;
  *) die "usage: lab.sh guest|start|stop ..." ;;
esac
