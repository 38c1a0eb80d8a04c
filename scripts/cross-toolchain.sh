#!/usr/bin/env bash
# The toolchain of a cross build of peat (make image ARCH=arm64): the Rust target and Debian's cross
# gcc (linker, and C compiler of aws-lc-sys) with the target's libc, whose libraries go into the image.
set -euo pipefail
arch="${1:?usage: cross-toolchain.sh arm64}"
case "$arch" in
  arm64) target=aarch64-unknown-linux-gnu; pkgs="gcc-aarch64-linux-gnu libc6-dev-arm64-cross" ;;
  *) echo "cross-toolchain.sh: no cross build for $arch (arm64 is supported)" >&2; exit 2 ;;
esac
rustup target list --installed | grep -qx "$target" || rustup target add "$target" >&2
missing=""
for p in $pkgs; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=" $p"; done
if [ -n "$missing" ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $missing >&2
fi
