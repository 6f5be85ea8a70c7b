#!/bin/sh
# Makes a minimal Debian (bookworm) image with python3 + venv, for machines that cannot pull
# python:3.11-slim (no image registry reachable). Built from the distribution mirror with
# debootstrap, which only needs the apt mirror, so it works where `docker pull` does not.
# Usage: build-base-image.sh [IMAGE]   (default dockercomp-base:bookworm)
# Skips the ~1 minute build when IMAGE already exists: the base is made once per machine.
set -eu

image="${1:-dockercomp-base:bookworm}"
suite="${DEBIAN_SUITE:-bookworm}"
# The Debian mirror this machine's apt already uses (deb822 or one-line sources), unless
# DEBIAN_MIRROR says otherwise: debootstrap then reaches exactly what apt-get reaches.
apt_mirror() {
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] && awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' "$f"
    done | head -n 1
    [ -f /etc/apt/sources.list ] && awk '$1 == "deb" && $2 !~ /security/ { print ($2 ~ /^\[/ ? $3 : $2); exit }' /etc/apt/sources.list
}
mirror="${DEBIAN_MIRROR:-$(apt_mirror | head -n 1)}"

if docker image inspect "$image" >/dev/null 2>&1; then
    echo "build-base-image: $image already present, skipping"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "build-base-image: debootstrap needs root; run as root or pass a BASE_IMAGE you can pull" >&2
    exit 1
fi
if [ -z "$mirror" ]; then
    echo "build-base-image: no Debian mirror found in /etc/apt; set DEBIAN_MIRROR=URL" >&2
    exit 1
fi
if ! command -v debootstrap >/dev/null 2>&1; then
    echo "build-base-image: installing debootstrap"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi

root="$(mktemp -d /tmp/dockercomp-base.XXXXXX)"
trap 'rm -rf "$root"' EXIT INT TERM
echo "build-base-image: debootstrap $suite into $root (about a minute)"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$suite" "$root" "$mirror" >"$root.log" 2>&1 || {
    tail -n 20 "$root.log" >&2
    echo "build-base-image: debootstrap failed; full log in $root.log" >&2
    exit 1
}
rm -f "$root.log"
# Package caches and lists are not needed at run time; they only make the image bigger.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$image" >/dev/null
echo "build-base-image: built $image"
