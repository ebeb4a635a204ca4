#!/usr/bin/env bash
# Fetch Debian trixie's containerd 1.7.x .deb and unpack it under /var/cache/pyvm/containerd-1.7/
# for the containerd 1.7 compatibility tests (tests/e2e/test_containerd17.py).
#
# The host's apt sources are NOT touched: a throwaway apt configuration (sources list, lists and
# cache dirs under a temp dir) is used for `update` and `download`. Idempotent: when the unpacked
# binaries are there and match the recorded version, it does nothing.
#
# Result:
#   /var/cache/pyvm/containerd-1.7/root/usr/bin/{containerd,ctr,containerd-shim-runc-v2}
#   /var/cache/pyvm/containerd-1.7/VERSION   (the Debian package version)
#   /var/cache/pyvm/containerd-1.7/bin -> root/usr/bin
#
# Env: PYVM_CONTAINERD17_DIR (default /var/cache/pyvm/containerd-1.7),
#      DEBIAN_MIRROR (default http://deb.debian.org/debian), FORCE=1 to refetch.
set -euo pipefail

DEST="${PYVM_CONTAINERD17_DIR:-/var/cache/pyvm/containerd-1.7}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE=trixie
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

have() {
    [[ -x "$DEST/root/usr/bin/containerd" && -x "$DEST/root/usr/bin/ctr" && -s "$DEST/VERSION" ]] \
        && "$DEST/root/usr/bin/containerd" --version 2>/dev/null | grep -q ' v\?1\.7\.'
}

if [[ "${FORCE:-0}" != 1 ]] && have; then
    echo "containerd 1.7 already at $DEST ($(cat "$DEST/VERSION"))"
    exit 0
fi

tmp="$(mktemp -d /tmp/pyvm-ctrd17.XXXXXX)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/lists/partial" "$tmp/archives/partial" "$tmp/etc/preferences.d"
echo "deb [signed-by=$KEYRING] $MIRROR $SUITE main" >"$tmp/trixie.list"

apt_opts=(
    -o "Dir::Etc::SourceList=$tmp/trixie.list"
    -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::Etc::PreferencesParts=$tmp/etc/preferences.d"
    -o "Dir::State::Lists=$tmp/lists"
    -o "Dir::Cache=$tmp"
    -o "Dir::Cache::archives=$tmp/archives"
    -o "Dir::Cache::pkgcache="
    -o "Dir::Cache::srcpkgcache="
    -o "APT::Architecture=$(dpkg --print-architecture)"
    -o "Acquire::Languages=none"
    -o "Debug::NoLocking=1"
    -o "APT::Sandbox::User=root"
)

echo "apt-get update (temporary $SUITE sources under $tmp)"
apt-get "${apt_opts[@]}" -qq update
version="$(apt-cache "${apt_opts[@]}" show containerd | awk '/^Version:/ {print $2; exit}')"
case "$version" in
    1.7.*) ;;
    *) echo "trixie's containerd is '$version', expected 1.7.x" >&2; exit 1 ;;
esac
echo "downloading containerd=$version"
(cd "$tmp" && apt-get "${apt_opts[@]}" -qq download "containerd=$version")
deb="$(ls "$tmp"/containerd_*.deb)"

# unpack into a fresh dir, then swap it in (a half-done unpack never looks finished)
rm -rf "$DEST.new"
mkdir -p "$DEST.new"
dpkg-deb -x "$deb" "$DEST.new/root"
echo "$version" >"$DEST.new/VERSION"
ln -s root/usr/bin "$DEST.new/bin"
"$DEST.new/root/usr/bin/containerd" --version
rm -rf "$DEST"
mv "$DEST.new" "$DEST"
echo "containerd $version unpacked at $DEST"
