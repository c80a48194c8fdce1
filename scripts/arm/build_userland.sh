#!/usr/bin/env bash
# Build an emulated Raspberry Pi 4 (arm64 Debian bookworm) userland for tests:
#
#   scripts/arm/build_userland.sh [CACHE_DIR]     (default .cache/arm64-userland)
#
#   CACHE_DIR/root/            arm64 Debian root with python3.11 (debootstrap, first stage
#                              only, then every .deb unpacked with dpkg -x: there is no
#                              binfmt_misc here, so the second stage cannot run)
#   CACHE_DIR/site/            the device-side Python packages (aarch64 wheels unpacked):
#                              numpy, apache-tvm-ffi, safetensors, ml_dtypes, typing_extensions
#   CACHE_DIR/lib/libtvm_runtime.so   the aarch64 TVM runtime (from the aarch64 apache-tvm wheel)
#   CACHE_DIR/wheels/runtime/  the downloaded runtime wheels (sizes: docs/arm.md)
#
# Run Python "on the board" with:
#   qemu-aarch64-static -L CACHE_DIR/root CACHE_DIR/root/usr/bin/python3.11   (PYTHONPATH=CACHE_DIR/site)
#
# Needs scripts/arm/setup_toolchain.sh first (debootstrap, qemu-user-static), network access
# to a Debian mirror (DEBIAN_MIRROR, default debootstrap's) and to PyPI, and root (debootstrap).
# Idempotent: each step leaves a stamp and is skipped when its stamp matches; a change of
# the recipe below rebuilds. Progress goes to stdout, errors to stderr with exit status 1.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/../.." && pwd)"
CACHE="${1:-$REPO/.cache/arm64-userland}"
SUITE=bookworm
PY_VERSION=3.11
# Pinned to the versions the host venv is tested with; the runtime library must come from
# the same apache-tvm release as the compiler that builds the artifacts.
TVM_VERSION=0.27.0.post1
RUNTIME_WHEELS=(
    numpy==2.4.6
    apache-tvm-ffi==0.1.15.post2
    safetensors==0.8.0
    ml_dtypes==0.6.0
    typing_extensions==4.16.0
)
PLATFORMS=(manylinux2014_aarch64 manylinux_2_28_aarch64)
RECIPE="suite=$SUITE python=$PY_VERSION tvm=$TVM_VERSION wheels=${RUNTIME_WHEELS[*]}"

if [ -x "$REPO/.venv/bin/python" ]; then
    PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
else
    PYTHON="${PYTHON:-python3}"
fi

log() { echo "[arm64-userland $(date +%H:%M:%S)] $*"; }
fail() { echo "arm64-userland: $*" >&2; exit 1; }

step_done() { [ -f "$CACHE/.stamp-$1" ] && [ "$(cat "$CACHE/.stamp-$1")" = "$RECIPE" ]; }
# A rebuilt step invalidates the final check, so it runs again.
mark_done() { echo "$RECIPE" > "$CACHE/.stamp-$1"; [ "$1" = check ] || rm -f "$CACHE/.stamp-check"; }

need_tool() {
    command -v "$1" >/dev/null || fail "$1 not found: run scripts/arm/setup_toolchain.sh (apt-get install $2)"
}

build_root() {
    step_done root && { log "root: cached ($CACHE/root)"; return; }
    need_tool debootstrap debootstrap
    need_tool dpkg-deb dpkg
    [ "$(id -u)" -eq 0 ] || fail "debootstrap needs root: run this script as root"
    log "root: debootstrap --foreign $SUITE arm64 (downloads ~40 MB of .debs)"
    rm -rf "$CACHE/root"
    mkdir -p "$CACHE/root"
    local mirror=()
    [ -n "${DEBIAN_MIRROR:-}" ] && mirror=("$DEBIAN_MIRROR")
    if ! debootstrap --arch=arm64 --variant=minbase --foreign --include=python3,python3-venv \
        "$SUITE" "$CACHE/root" "${mirror[@]}" > "$CACHE/debootstrap.log" 2>&1; then
        tail -20 "$CACHE/debootstrap.log" >&2
        fail "debootstrap failed (full log: $CACHE/debootstrap.log)"
    fi
    log "root: unpacking $(ls "$CACHE/root/var/cache/apt/archives/"*.deb | wc -l) packages with dpkg -x"
    for deb in "$CACHE/root/var/cache/apt/archives/"*.deb; do
        dpkg-deb -x "$deb" "$CACHE/root" || fail "dpkg -x $deb failed"
    done
    rm -f "$CACHE/root/var/cache/apt/archives/"*.deb  # 40 MB we no longer need
    [ -x "$CACHE/root/usr/bin/python$PY_VERSION" ] || fail "no usr/bin/python$PY_VERSION in the unpacked root"
    mark_done root
}

download_wheels() {
    step_done wheels && { log "wheels: cached ($CACHE/wheels)"; return; }
    "$PYTHON" -m pip --version >/dev/null 2>&1 || fail "$PYTHON has no pip: set PYTHON to a Python with pip (make setup creates .venv)"
    local platform_args=()
    for platform in "${PLATFORMS[@]}"; do platform_args+=(--platform "$platform"); done
    rm -rf "$CACHE/wheels" && mkdir -p "$CACHE/wheels/runtime" "$CACHE/wheels/tvm"
    log "wheels: downloading the aarch64 runtime set: ${RUNTIME_WHEELS[*]}"
    "$PYTHON" -m pip download -q --only-binary=:all: --python-version "$PY_VERSION" "${platform_args[@]}" \
        --dest "$CACHE/wheels/runtime" "${RUNTIME_WHEELS[@]}" || fail "pip download of the runtime wheels failed"
    log "wheels: downloading apache-tvm==$TVM_VERSION for aarch64 (~95 MB; only tvm/lib/libtvm_runtime.so is kept)"
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" "${platform_args[@]}" \
        --dest "$CACHE/wheels/tvm" "apache-tvm==$TVM_VERSION" || fail "pip download of apache-tvm failed"
    rm -rf "$CACHE/lib" && mkdir -p "$CACHE/lib"
    "$PYTHON" - "$CACHE" <<'PYEOF' || fail "extracting libtvm_runtime.so from the apache-tvm wheel failed"
import pathlib, shutil, sys, zipfile

cache = pathlib.Path(sys.argv[1])
(tvm_wheel,) = (cache / "wheels" / "tvm").glob("apache_tvm-*.whl")
with zipfile.ZipFile(tvm_wheel) as archive, archive.open("tvm/lib/libtvm_runtime.so") as source:
    with open(cache / "lib" / "libtvm_runtime.so", "wb") as target:
        shutil.copyfileobj(source, target)
PYEOF
    chmod 755 "$CACHE/lib/libtvm_runtime.so"
    rm -rf "$CACHE/wheels/tvm"  # the compiler wheel is not needed on the device
    mark_done wheels
    rm -f "$CACHE/.stamp-site"  # new wheels: unpack them again
}

unpack_site() {
    step_done site && { log "site: cached ($CACHE/site)"; return; }
    log "site: unpacking the runtime wheels"
    rm -rf "$CACHE/site" && mkdir -p "$CACHE/site"
    "$PYTHON" - "$CACHE" <<'PYEOF' || fail "unpacking the wheels failed"
import pathlib, sys, zipfile

cache = pathlib.Path(sys.argv[1])
for wheel in sorted((cache / "wheels" / "runtime").glob("*.whl")):
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(cache / "site")
PYEOF
    # zipfile drops the execute bits; shared libraries load without them, but keep them tidy.
    find "$CACHE/site" -name "*.so*" -exec chmod 755 {} +
    mark_done site
}

smoke_test() {
    step_done check && { log "check: passed before"; return; }
    need_tool qemu-aarch64-static qemu-user-static
    log "check: import numpy, tvm_ffi and load libtvm_runtime.so under qemu-aarch64"
    local out
    out=$(PYTHONPATH="$CACHE/site" qemu-aarch64-static -L "$CACHE/root" "$CACHE/root/usr/bin/python$PY_VERSION" -c "
import sys, ctypes, platform
sys.modules['torch'] = None
import numpy, tvm_ffi
ctypes.CDLL('$CACHE/lib/libtvm_runtime.so', mode=ctypes.RTLD_GLOBAL)
assert tvm_ffi.get_global_func('vm.builtin.alloc_storage', allow_missing=True) is not None
print(platform.machine(), 'python', platform.python_version(), 'numpy', numpy.__version__)
" 2>&1) || { echo "$out" >&2; fail "the userland does not run under qemu-aarch64-static"; }
    log "check: $out"
    mark_done check
}

mkdir -p "$CACHE"
CACHE="$(cd "$CACHE" && pwd)"
start=$SECONDS
case "$(uname -m)" in x86_64 | aarch64) ;; *) fail "unsupported host $(uname -m)";; esac
build_root
download_wheels
unpack_site
smoke_test
log "ready in $((SECONDS - start)) s: $CACHE"
