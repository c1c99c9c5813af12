#!/bin/sh
# Build LazyFS (power-cut simulation FUSE filesystem) offline, from the bundled source.
#   build.sh [PREFIX]          PREFIX default: $LAZYFS_PREFIX or /var/cache/lazyfs
# Installs the Debian packages it needs (root, apt-get), builds into PREFIX (skipped when
# already built from the same source and patches), prints the path of the lazyfs binary
# as the last line of stdout. Set LAZYFS_NO_APT=1 to skip apt-get. JOBS (default 2).
set -eu
KIT=$(cd "$(dirname "$0")" && pwd)
PREFIX=${1:-${LAZYFS_PREFIX:-/var/cache/lazyfs}}
JOBS=${JOBS:-2}
PKGS="cmake make g++ pkg-config patch fuse3 libfuse3-dev libspdlog-dev libtoml11-dev"

# Stamp: the source tarball and the patches; a change in either rebuilds.
STAMP=$(cat "$KIT/lazyfs-src.tar.gz" "$KIT"/patches/*.patch | sha256sum | cut -c1-16)
BIN="$PREFIX/src/lazyfs/build/lazyfs"
if [ -x "$BIN" ] && [ "$(cat "$PREFIX/.stamp" 2>/dev/null)" = "$STAMP" ] \
   && ! ldd "$BIN" | grep -q 'not found'; then
    echo "lazyfs already built in $PREFIX" >&2
    echo "$BIN"; exit 0
fi

if [ "${LAZYFS_NO_APT:-0}" != 1 ]; then
    missing=""
    for p in $PKGS; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
    done
    if [ -n "$missing" ]; then
        echo "installing:$missing" >&2
        export DEBIAN_FRONTEND=noninteractive
        # Another apt run (unattended upgrades, a parallel job) holds dpkg's lock for a while:
        # wait for it rather than failing at once.
        apt-get -o DPkg::Lock::Timeout=300 update -q >&2 ||
            echo "warning: apt-get update failed; trying the install anyway" >&2
        # shellcheck disable=SC2086
        apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends $missing >&2
    fi
fi

mkdir -p "$PREFIX"
rm -rf "$PREFIX/src" "$PREFIX/.stamp"
mkdir -p "$PREFIX/src"
tar -xzf "$KIT/lazyfs-src.tar.gz" -C "$PREFIX/src" --strip-components=1
for p in "$KIT"/patches/*.patch; do
    patch -d "$PREFIX/src" -p1 --forward --quiet < "$p" >&2
done

# libpcache first (lazyfs links $PREFIX/src/libs/libpcache/build/libpcache.so, rpath to it).
cmake -S "$PREFIX/src/libs/libpcache" -B "$PREFIX/src/libs/libpcache/build" \
      -DCMAKE_BUILD_TYPE=Release >&2
cmake --build "$PREFIX/src/libs/libpcache/build" -j "$JOBS" >&2
cmake -S "$PREFIX/src/lazyfs" -B "$PREFIX/src/lazyfs/build" \
      -DCMAKE_BUILD_TYPE=Release -DLAZYFS_BUILD_TESTS=OFF >&2
cmake --build "$PREFIX/src/lazyfs/build" -j "$JOBS" >&2

if ldd "$BIN" | grep 'not found' >&2; then echo "error: $BIN has unresolved libraries" >&2; exit 1; fi
echo "$STAMP" > "$PREFIX/.stamp"
echo "$BIN"
