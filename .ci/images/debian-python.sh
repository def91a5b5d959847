#!/usr/bin/env bash
# skiff-ci/python:3.11-bookworm — a stand-in for the official python:3.11-slim, which cannot be
# pulled here: a Debian bookworm minbase rootfs (debootstrap from Debian's mirror) with python3
# (3.11), venv/ensurepip and CA certificates, imported with `docker import`. app/Dockerfile builds
# on it with `--build-arg BASE=skiff-ci/python:3.11-bookworm`.
# Skipped when the image exists. The rootfs tarball is cached under $SKIFF_CI_HOME, keyed by the
# package list, so re-importing it after `docker rmi` takes seconds instead of minutes.
set -euo pipefail
img=skiff-ci/python:3.11-bookworm
home=${SKIFF_CI_HOME:-/var/lib/skiff-ci}
mirror=${SKIFF_DEBIAN_MIRROR:-http://deb.debian.org/debian}
include=python3,python3-venv,ca-certificates
docker image inspect "$img" >/dev/null 2>&1 && exit 0

mkdir -p "$home"
# Two setup runs at once must not debootstrap into each other's way.
exec 9>"$home/debian-python.lock"
flock 9
docker image inspect "$img" >/dev/null 2>&1 && exit 0

tarball="$home/debian-python-bookworm-$(echo "$include" | sha1sum | cut -c1-12).tar"
if [ ! -s "$tarball" ]; then
  echo "[setup] debootstrapping bookworm with $include (cache: $tarball)"
  root=$(mktemp -d "$home/debian-python-root.XXXXXX")
  cleanup() {
    # debootstrap mounts /proc and /sys in the target; a failed run can leave them behind.
    for m in proc sys dev/pts; do mountpoint -q "$root/$m" 2>/dev/null && umount -l "$root/$m"; done
    rm -rf "$root" "$tarball.partial"
  }
  trap cleanup EXIT
  mkdir -p "$home/debootstrap-cache"
  debootstrap --variant=minbase --include="$include" --cache-dir="$home/debootstrap-cache" \
    bookworm "$root" "$mirror" >"$home/debian-python-debootstrap.log" 2>&1 ||
    { echo "debian-python: debootstrap failed; see $home/debian-python-debootstrap.log" >&2; exit 1; }
  # What an image does not need: package lists and caches, docs, man pages.
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/tmp/*
  tar -C "$root" --numeric-owner -cf "$tarball.partial" .
  mv "$tarball.partial" "$tarball"
fi

echo "[setup] importing $img from $tarball"
docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  --message "debootstrap bookworm minbase + $include" \
  - "$img" <"$tarball" >/dev/null
