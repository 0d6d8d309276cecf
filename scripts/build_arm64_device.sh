#!/usr/bin/env bash
# Build (or reuse) an arm64 test device on this x86-64 machine: a Debian bookworm arm64 root
# filesystem whose binaries run through qemu-user (binfmt_misc), with a runtime-only edgelm
# (no torch) and aarch64 wheels of the runtimes that publish them. Needs root.
#
#   bash scripts/build_arm64_device.sh [ROOT]     # default $EDGELM_ARM64_ROOT or /var/cache/edgelm/arm64-root
#   EDGELM_DEVICES=chroot:ROOT edgelm devices      # then: edgelm push / edgelm profile --device chroot:ROOT
#
# Removing it: the chroot transport mounts proc and sysfs inside it on first use, so unmount
# them first (`umount ROOT/proc ROOT/sys && rm -rf ROOT`); a bare rm -rf would walk into them.
#
# The root filesystem is cached (about 6 minutes to build on 2 cores); the edgelm install in
# it is refreshed on every run, so the device always runs this checkout's code.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="${1:-${EDGELM_ARM64_ROOT:-/var/cache/edgelm/arm64-root}}"
PYTHON_HOST="${EDGELM_VENV:-.venv}/bin/python"
[ "$(id -u)" = 0 ] || { echo "run as root: debootstrap, binfmt_misc and chroot need it"; exit 2; }
log=$(mktemp)
trap 'rm -f "$log"' EXIT

# qemu-user 7.2 (bookworm) crashes importing onnxruntime's and LiteRT's aarch64 builds;
# 10.0 (bookworm-backports) runs them. Older than 8 is replaced.
qemu_major() { /usr/bin/qemu-aarch64-static --version 2>/dev/null | sed -n 's/.*version \([0-9]*\)\..*/\1/p'; }
install() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >"$log" 2>&1 \
        || { apt-get update -q >"$log" 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >"$log" 2>&1; } \
        || { tail -20 "$log"; echo "could not install $*"; exit 1; }
}
command -v debootstrap >/dev/null && command -v update-binfmts >/dev/null || install debootstrap binfmt-support
if [ "$(qemu_major || echo 0)" -lt 8 ] 2>/dev/null || [ -z "$(qemu_major)" ]; then
    if grep -q bookworm /etc/os-release && ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d; then
        echo "deb http://deb.debian.org/debian bookworm-backports main" > /etc/apt/sources.list.d/edgelm-backports.list
        apt-get update -q >"$log" 2>&1
    fi
    if grep -q bookworm /etc/os-release; then install -t bookworm-backports qemu-user-static; else install qemu-user-static; fi
fi
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
# re-register: with the F flag the kernel keeps the interpreter opened at registration
update-binfmts --disable qemu-aarch64 >/dev/null 2>&1 || true
update-binfmts --enable qemu-aarch64
echo "qemu-user $(qemu_major) registered for aarch64"

if [ ! -f "$ROOT/.edgelm-root-complete" ]; then
    echo "building the arm64 root filesystem in $ROOT (about 6 minutes)"
    rm -rf "$ROOT"
    mkdir -p "$(dirname "$ROOT")"
    debootstrap --foreign --arch=arm64 --variant=minbase --include=python3 bookworm "$ROOT" \
        http://deb.debian.org/debian >"$log" 2>&1 || { tail -20 "$log"; echo "debootstrap (first stage) failed"; exit 1; }
    cp /usr/bin/qemu-aarch64-static "$ROOT/usr/bin/"
    chroot "$ROOT" /debootstrap/debootstrap --second-stage >"$log" 2>&1 \
        || { tail -20 "$log"; echo "debootstrap (second stage, emulated) failed"; exit 1; }
    touch "$ROOT/.edgelm-root-complete"
fi

# Runtime-only edgelm and the aarch64 wheels, installed with this machine's pip into the
# root's site-packages (Debian's python3 reads /usr/local/lib/python3.11/dist-packages).
SITE="$ROOT/usr/local/lib/python3.11/dist-packages"
mkdir -p "$SITE"
WHEELS=$(mktemp -d)
"$PYTHON_HOST" -m pip wheel -q --no-deps -w "$WHEELS" . >"$log" 2>&1 || { tail -20 "$log"; exit 1; }
PLATFORMS="--platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64"
# shellcheck disable=SC2086
"$PYTHON_HOST" -m pip install -q --upgrade --target "$SITE" $PLATFORMS --implementation cp --python-version 3.11 \
    --only-binary :all: "$WHEELS"/edgelm-*.whl "numpy>=1.26,<3" "tokenizers>=0.22,<0.24" "jinja2>=3.1,<4" \
    "jsonschema>=4.20,<5" "typer>=0.15,<0.30" "rich>=13,<16" "psutil>=5.9,<8" "matplotlib>=3.8,<4" \
    "safetensors>=0.4,<0.9" "onnx==1.23.2" "onnxruntime==1.32.0" "ai-edge-litert==2.3.0" >"$log" 2>&1 \
    || { grep -v "is ignored: it is neither" "$log" | tail -20; echo "installing the aarch64 wheels failed"; exit 1; }
rm -rf "$WHEELS"
chroot "$ROOT" python3 -c "import edgelm, platform; print('arm64 device ready:', platform.machine(), 'edgelm', edgelm.__version__)"
echo "use it with: --device chroot:$ROOT (or EDGELM_DEVICES=chroot:$ROOT)"
