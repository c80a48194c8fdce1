#!/usr/bin/env bash
# Install what building for and emulating an arm64 board (Raspberry Pi 4) needs on a
# Debian/Ubuntu x86_64 machine: the aarch64 cross compiler, qemu's user-mode emulator
# and debootstrap (for the arm64 userland, scripts/arm/build_userland.sh).
# Idempotent: installs only what is missing; runs `apt-get update` once, only then.
set -euo pipefail

PACKAGES=(gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user-static debootstrap)

missing=()
for package in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$package")
    fi
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "arm toolchain: all installed (${PACKAGES[*]})"
    exit 0
fi

if ! command -v apt-get >/dev/null; then
    echo "arm toolchain: missing ${missing[*]} and no apt-get here; install them with your package manager" >&2
    exit 1
fi

sudo=()
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null; then
        echo "arm toolchain: missing ${missing[*]}; run as root: apt-get install ${missing[*]}" >&2
        exit 1
    fi
    sudo=(sudo)
fi

echo "arm toolchain: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -q
"${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
echo "arm toolchain: done"
