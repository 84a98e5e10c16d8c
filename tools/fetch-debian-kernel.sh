#!/bin/sh
# Fetch Debian's cloud kernel (the package behind the linux-image-cloud-amd64 metapackage) with
# apt-get download and extract its vmlinuz into a cache outside the clone, keyed by the package
# name and version. Idempotent: when the cache holds that version it only prints the path.
#
#   tools/fetch-debian-kernel.sh [CACHE_DIR]    (default /var/cache/virtkit/kernels)
#
# Prints the path of the bzImage on success. Nothing but the registry's own client is used.
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
if [ -s "$dir/vmlinuz" ]; then
  echo "$dir/vmlinuz"
  exit 0
fi
mkdir -p "$cache"
work=$(mktemp -d "$cache/.fetch.XXXXXX")
chmod 755 "$work"  # apt-get download hands the file to the _apt user
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -q "$pkg=$version" >/dev/null)
dpkg-deb -x "$work"/*.deb "$work/root"
mkdir -p "$work/out"
cp "$work/root/boot/vmlinuz-$release" "$work/out/vmlinuz"
cp "$work/root/boot/config-$release" "$work/out/config" 2>/dev/null || true
echo "$pkg $version" > "$work/out/PACKAGE"
rm -rf "$dir"
mv "$work/out" "$dir"
echo "$dir/vmlinuz"
