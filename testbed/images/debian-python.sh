#!/usr/bin/env bash
# skiff-ci/python:3.11-bookworm — a stand-in for the official python:3.11-slim, which cannot be
# pulled here: a Debian bookworm minbase rootfs (debootstrap from Debian's mirror) with python3
# (3.11), venv/ensurepip and CA certificates, imported with `docker import`. app/Dockerfile builds
# on it with `--build-arg BASE=skiff-ci/python:3.11-bookworm`.
# The image trusts the CAs this host trusts (its /etc/ssl/certs bundle, also named in /etc/pip.conf
# since pip ships its own list): `pip install` in a build then works behind a TLS-inspecting proxy,
# as on this workplace's machines. Elsewhere that bundle is just Debian's.
# Skipped when the image exists with the host's current bundle. The rootfs tarball is cached under
# $SKIFF_CI_HOME, keyed by the package list, so a re-import takes seconds instead of minutes.
set -euo pipefail
img=skiff-ci/python:3.11-bookworm
home=${SKIFF_CI_HOME:-/var/lib/skiff-ci}
mirror=${SKIFF_DEBIAN_MIRROR:-http://deb.debian.org/debian}
include=python3,python3-venv,ca-certificates
bundle=/etc/ssl/certs/ca-certificates.crt
ca_sum=$(sha1sum "$bundle" | cut -c1-12)
current() { [ "$(docker image inspect -f '{{index .Config.Labels "skiff-ci.ca"}}' "$img" 2>/dev/null)" = "$ca_sum" ]; }
current && exit 0

mkdir -p "$home"
# Two setup runs at once must not debootstrap into each other's way.
exec 9>"$home/debian-python.lock"
flock 9
current && exit 0

tarball="$home/debian-python-bookworm-$(echo "$include" | sha1sum | cut -c1-12).tar"
root="" work=""
cleanup() {
  if [ -n "$root" ]; then
    # debootstrap mounts /proc and /sys in the target; a failed run can leave them behind.
    for m in proc sys dev/pts; do mountpoint -q "$root/$m" 2>/dev/null && umount -l "$root/$m"; done
    rm -rf "$root" "$tarball.partial"
  fi
  [ -z "$work" ] || rm -rf "$work"
}
trap cleanup EXIT
if [ ! -s "$tarball" ]; then
  echo "[setup] debootstrapping bookworm with $include (cache: $tarball)"
  root=$(mktemp -d "$home/debian-python-root.XXXXXX")
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
# The cached rootfs with the host's CA trust in place of Debian's (docker refuses duplicate paths).
work=$(mktemp -d "$home/debian-python-import.XXXXXX")
mkdir -p "$work/add/etc/ssl/certs"
cp "$bundle" "$work/add/etc/ssl/certs/ca-certificates.crt"
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$work/add/etc/pip.conf"
cp "$tarball" "$work/rootfs.tar"
tar --delete -f "$work/rootfs.tar" ./etc/ssl/certs/ca-certificates.crt
tar -C "$work/add" --owner=0 --group=0 --numeric-owner -rf "$work/rootfs.tar" \
  ./etc/ssl/certs/ca-certificates.crt ./etc/pip.conf
old=$(docker image inspect -f '{{.Id}}' "$img" 2>/dev/null || true)
docker import \
  --change "LABEL skiff-ci.ca=$ca_sum" \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  --message "debootstrap bookworm minbase + $include" \
  - "$img" <"$work/rootfs.tar" >/dev/null
# The image this replaced (an older CA bundle); kept if something is still built on it.
[ -z "$old" ] || docker rmi "$old" >/dev/null 2>&1 || true
