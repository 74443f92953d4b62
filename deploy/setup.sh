#!/usr/bin/env bash
# Idempotent host setup for meshaccel (Debian/Ubuntu, as root):
# apt packages, kernel headers for bcc (with a fallback), bpffs, a venv that can
# import Debian's bcc. Safe to run again: each step checks before it acts.
#   deploy/setup.sh            the agent, the demo and the benchmarks
#   deploy/setup.sh --docker   also docker.io + docker-compose and a running dockerd
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ACCEL_VENV:-$ROOT/.venv}"
WITH_DOCKER=0
for arg in "$@"; do
  case "$arg" in
    --docker) WITH_DOCKER=1 ;;
    *) echo "setup: unknown option $arg" >&2; exit 2 ;;
  esac
done

say() { echo "[setup] $*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "setup: run as root (eBPF programs, bpffs and network namespaces need it)" >&2
  exit 1
fi

PKGS=(python3 python3-venv python3-bpfcc bpfcc-tools bpftool iproute2 iptables
      sockperf iperf3 haproxy tcpdump ethtool openssl gcc libc6-dev)
# debootstrap: compose/build-images.sh makes the local Debian base image (nothing pulled).
if [ "$WITH_DOCKER" = 1 ]; then PKGS+=(docker.io docker-compose debootstrap); fi
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q "${missing[@]}" >/dev/null
fi

# bcc compiles against kernel headers. Without headers for the running kernel,
# Debian's generic headers serve: the networking UAPI the programs use is stable.
KREL="$(uname -r)"
if [ ! -e "/lib/modules/$KREL/build/include" ]; then
  if ! apt-get install -y -q "linux-headers-$KREL" >/dev/null 2>&1; then
    dpkg-query -W -f='${Status}' linux-headers-amd64 2>/dev/null | grep -q "ok installed" \
      || apt-get install -y -q linux-headers-amd64 >/dev/null
    HDR="$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -1)"
    COMMON="${HDR%-amd64}-common"
    mkdir -p "/lib/modules/$KREL"
    ln -sfn "$HDR" "/lib/modules/$KREL/build"
    ln -sfn "$COMMON" "/lib/modules/$KREL/source"
    say "NOTICE: no kernel headers for $KREL; linked $(basename "$HDR") as its build/source tree (networking UAPI is stable)"
  fi
fi

mountpoint -q /sys/fs/bpf || { mount -t bpf bpf /sys/fs/bpf; say "mounted bpffs on /sys/fs/bpf"; }
sysctl -qw net.ipv4.ip_forward=1

# The venv uses Debian's python3 (the one bcc is built for) and sees only bcc
# from dist-packages, through a .pth file, not the whole system site.
if [ ! -x "$VENV/bin/python" ]; then
  say "creating venv $VENV"
  /usr/bin/python3 -m venv "$VENV"
fi
SITE="$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')"
mkdir -p "$SITE/_accel_sys"
ln -sfn /usr/lib/python3/dist-packages/bcc "$SITE/_accel_sys/bcc"
echo "$SITE/_accel_sys" > "$SITE/accel_bcc.pth"
STAMP="$VENV/.accel-installed"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
  say "installing meshaccel into the venv"
  "$VENV/bin/pip" install -q --disable-pip-version-check -e "$ROOT[dev]"
  touch "$STAMP"
fi
"$VENV/bin/python" -c 'import bcc' || { echo "setup: bcc does not import in $VENV" >&2; exit 1; }

if [ "$WITH_DOCKER" = 1 ]; then
  if ! docker info >/dev/null 2>&1; then
    say "starting dockerd"
    (dockerd >/var/log/dockerd.log 2>&1 &)
    for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    docker info >/dev/null 2>&1 || { echo "setup: dockerd did not start, see /var/log/dockerd.log" >&2; exit 1; }
  fi
fi
say "ready"
