#!/usr/bin/env bash
# Builds the Linux aarch64 abi3 wheel on an x86-64 machine (zig as the cross linker) and runs
# `rlmask demo` from it under qemu-user with Debian's arm64 Python, then compares the figures
# with the native build's: they must be identical (bit-exact across architectures).
#
#   bash scripts/check_aarch64_wheel.sh [WORKDIR]     # Debian/Ubuntu, as root
#
# Needs: rustup (the aarch64 target is added), pip, apt with Debian's arm64 packages, and
# qemu-user-static. A release step (docs/RELEASING.md), not part of CI: the arm64 packages
# and the target's standard library are downloads.
set -euo pipefail
work=${1:-$(mktemp -d)}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$work"/{dist,deb,sysroot,site,demo-arm,demo-native}

rustup target add aarch64-unknown-linux-gnu
pip install -q "maturin>=1.7,<2" ziglang
(cd "$root" && maturin build --release --zig --compatibility manylinux2014 \
  --target aarch64-unknown-linux-gnu --out "$work/dist")

# An arm64 Python 3.11 and the libraries it and the extension link against.
command -v qemu-aarch64-static >/dev/null || apt-get install -y -q qemu-user-static
dpkg --add-architecture arm64
apt-get update -q
(cd "$work/deb" && apt-get download libc6:arm64 libgcc-s1:arm64 zlib1g:arm64 libexpat1:arm64 \
  libffi8:arm64 libssl3:arm64 libpython3.11-minimal:arm64 libpython3.11-stdlib:arm64 \
  python3.11-minimal:arm64 libbz2-1.0:arm64 liblzma5:arm64 libsqlite3-0:arm64 libuuid1:arm64 \
  libncursesw6:arm64 libtinfo6:arm64 libreadline8:arm64 libcrypt1:arm64 libdb5.3:arm64 \
  libgdbm6:arm64 libnsl2:arm64 libtirpc3:arm64 media-types)
for d in "$work"/deb/*.deb; do dpkg -x "$d" "$work/sysroot"; done

# The wheel and its dependencies' aarch64 wheels, unpacked side by side.
pip download -q --only-binary=:all: --platform manylinux2014_aarch64 \
  --platform manylinux_2_17_aarch64 --python-version 3.11 --implementation cp --abi cp311 \
  -d "$work/wheels" numpy polars click tqdm
for w in "$work"/wheels/*.whl "$work"/dist/*aarch64*.whl; do
  python -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$w" "$work/site"
done
file "$work"/site/rlmask/_rlmask*.so

run_arm() {
  PYTHONPATH="$work/site" qemu-aarch64-static -L "$work/sysroot" "$work/sysroot/usr/bin/python3.11" \
    -c "import sys; sys.argv = ['rlmask', *sys.argv[1:]]; from rlmask.cli import main; main()" "$@"
}
run_arm --version
(cd "$work/demo-arm" && run_arm demo > demo.txt)
(cd "$work/demo-native" && rlmask demo > demo.txt)
# The first line names where the example lives; every figure after it must agree.
diff <(tail -n +2 "$work/demo-arm/demo.txt") <(tail -n +2 "$work/demo-native/demo.txt")
echo "aarch64 wheel: built, runs under qemu, demo figures identical to the native build's"
