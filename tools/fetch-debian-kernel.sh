#!/bin/sh
# Fetch Debian's cloud kernel (the package behind the linux-image-cloud-amd64 metapackage) with
# apt-get download and extract its vmlinuz into a cache outside the clone, keyed by the package
# name and version. Idempotent: when the cache holds that version it only prints the path.
#
#   tools/fetch-debian-kernel.sh [CACHE_DIR]    (default /var/cache/virtkit/kernels)
#
# Prints the path of the bzImage on success; next to it, vmlinux is the uncompressed ELF kernel
# taken out of the bzImage (Debian compresses it with LZ4: unlz4, Debian package lz4), for the
# vmlinux and PVH boot tests. Nothing but the registry's own client is used.
set -eu
cache=${1:-${VIRTKIT_KERNEL_CACHE:-/var/cache/virtkit/kernels}}
meta=linux-image-cloud-amd64
# the real package: the metapackage's first linux-image-* dependency
pkg=$(apt-cache depends "$meta" 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\)$/\1/p' | head -n1)
if [ -z "$pkg" ]; then
  echo "fetch-debian-kernel: apt-cache does not know $meta: run apt-get update" >&2
  exit 1
fi
version=$(apt-cache policy "$pkg" | sed -n 's/^ *Candidate: *//p')
case "$version" in ''|'(none)') echo "fetch-debian-kernel: no candidate version of $pkg" >&2; exit 1;; esac
release=${pkg#linux-image-}
dir="$cache/debian-cloud-$release-$version"
if [ -s "$dir/vmlinuz" ] && [ -s "$dir/vmlinux" ]; then
  echo "$dir/vmlinuz"
  exit 0
fi
mkdir -p "$cache"
work=$(mktemp -d "$cache/.fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT
# as root, apt would hand the download to its _apt sandbox user, who cannot write here
(cd "$work" && apt-get download -q -o APT::Sandbox::User=root "$pkg=$version" >/dev/null)
dpkg-deb -x "$work"/*.deb "$work/root"
mkdir -p "$work/out"
cp "$work/root/boot/vmlinuz-$release" "$work/out/vmlinuz"
cp "$work/root/boot/config-$release" "$work/out/config" 2>/dev/null || true
# the compressed payload starts at the LZ4 legacy frame magic (02 21 4c 18); unlz4 stops at the
# frame's end and complains about what follows it, so its status is not the check: readelf is
offset=$(python3 -c 'import sys; print(open(sys.argv[1], "rb").read().find(b"\x02\x21\x4c\x18"))' "$work/out/vmlinuz")
if [ "$offset" -lt 0 ]; then
  echo "fetch-debian-kernel: $pkg's vmlinuz has no LZ4 payload: cannot extract vmlinux" >&2
  exit 1
fi
tail -c +$((offset + 1)) "$work/out/vmlinuz" | unlz4 -c > "$work/out/vmlinux" 2>/dev/null || true
if ! readelf -h "$work/out/vmlinux" >/dev/null 2>&1; then
  echo "fetch-debian-kernel: could not extract vmlinux from $pkg's vmlinuz (is unlz4 installed?)" >&2
  exit 1
fi
echo "$pkg $version" > "$work/out/PACKAGE"
rm -rf "$dir"
mv "$work/out" "$dir"
echo "$dir/vmlinuz"
