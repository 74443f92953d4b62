#!/usr/bin/env bash
# Build every image the compose files use, on this host, pulling nothing from a registry:
#   meshaccel/debian:bookworm  base: debootstrap of Debian bookworm from this host's apt mirror
#   meshaccel:local            the controller and the agent (compose/Dockerfile)
#   meshaccel/app:local        the example mesh's app (compose/app/Dockerfile)
#   meshaccel/sidecar:local    haproxy, the sidecar baseline (compose/sidecar/Dockerfile)
# Safe to run again: the base is made once, docker's layer cache does the rest.
#   ACCEL_BASE_IMAGE=debian:bookworm-slim compose/build-images.sh   use a registry base instead
#   ACCEL_REBUILD_BASE=1 compose/build-images.sh                    remake the debootstrap base
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
BASE="${ACCEL_BASE_IMAGE:-meshaccel/debian:bookworm}"
PY="${ACCEL_PYTHON:-$ROOT/.venv/bin/python}"
say() { echo "[build-images] $*"; }
t0=$SECONDS

docker info >/dev/null 2>&1 || { echo "build-images: dockerd is not reachable (deploy/setup.sh --docker starts it)" >&2; exit 1; }

# The host's own Debian mirror, so the base and apt inside the builds use what this host reaches.
mirror() {
  local uri
  uri="$(grep -hE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
           /etc/apt/sources.list.d/*.sources 2>/dev/null \
         | grep -E '/debian/?( |$)' | grep -v security | head -1 \
         | sed -E 's/^URIs: *//; s/^deb (\[[^]]*\] )?//; s/ .*//')"
  echo "${uri:-http://deb.debian.org/debian}"
}

if [ "$BASE" = meshaccel/debian:bookworm ] \
   && { [ "${ACCEL_REBUILD_BASE:-0}" = 1 ] || ! docker image inspect "$BASE" >/dev/null 2>&1; }; then
  command -v debootstrap >/dev/null || { echo "build-images: needs debootstrap (apt-get install debootstrap)" >&2; exit 1; }
  MIRROR="$(mirror)"
  say "making $BASE with debootstrap from $MIRROR"
  tmp="$(mktemp -d /tmp/meshaccel-rootfs.XXXXXX)"
  trap 'rm -rf "$tmp"' EXIT
  debootstrap --variant=minbase bookworm "$tmp/root" "$MIRROR" >"$tmp/log" 2>&1 \
    || { tail -20 "$tmp/log" >&2; echo "build-images: debootstrap failed" >&2; exit 1; }
  # Like the registry's debian images: no apt caches, apt cleans after itself.
  rm -rf "$tmp/root/var/cache/apt/archives/"*.deb "$tmp/root/var/lib/apt/lists/"*
  tar -C "$tmp/root" -c . | docker import \
    -c 'CMD ["/bin/bash"]' -c 'ENV LANG=C.UTF-8' \
    -c "LABEL org.opencontainers.image.source=debootstrap-bookworm" - "$BASE" >/dev/null
  rm -rf "$tmp"; trap - EXIT
  say "base ready ($((SECONDS - t0)) s)"
fi

# Python dependencies come in as wheels fetched by the host's pip: builds then need no PyPI
# access from inside a container (which may not trust the host's TLS setup).
WHEELS="$HERE/wheels"
REQS="$("$PY" - "$ROOT/pyproject.toml" <<'PYEOF'
import sys, tomllib
p = tomllib.load(open(sys.argv[1], "rb"))["project"]
print("\n".join(p["dependencies"] + p["optional-dependencies"]["docker"]))
PYEOF
)"
STAMP="$WHEELS/.reqs"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$REQS" ]; then
  say "fetching wheels for: $(echo "$REQS" | tr '\n' ' ')"
  rm -f "$WHEELS"/*.whl
  echo "$REQS" > "$WHEELS/requirements.txt.tmp"
  "$PY" -m pip download -q --disable-pip-version-check --only-binary=:all: \
    -d "$WHEELS" -r "$WHEELS/requirements.txt.tmp" 2> >(grep -v "is ignored: it is neither" >&2)
  rm -f "$WHEELS/requirements.txt.tmp"
  echo "$REQS" > "$STAMP"
fi

build() {  # build TAG DOCKERFILE CONTEXT
  local s=$SECONDS out
  if ! out="$(docker build -q --build-arg "BASE=$BASE" -t "$1" -f "$2" "$3" 2>&1)"; then
    echo "$out" | grep -v -e 'legacy builder is deprecated' -e 'buildx' >&2
    echo "build-images: building $1 failed" >&2
    exit 1
  fi
  say "$1 ($((SECONDS - s)) s)"
}
build meshaccel/app:local "$HERE/app/Dockerfile" "$HERE/app"
build meshaccel/sidecar:local "$HERE/sidecar/Dockerfile" "$HERE/sidecar"
build meshaccel:local "$HERE/Dockerfile" "$ROOT"
say "all images built in $((SECONDS - t0)) s"
