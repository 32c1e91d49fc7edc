#!/usr/bin/env bash
# Prepare a fresh machine for vmmig: QEMU (from Debian's packages when it is
# missing and we are root), a virtualenv in .venv, and vmmig with its test
# dependencies installed into it. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "bootstrap: installing qemu-system-x86 from Debian's packages" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq qemu-system-x86 binutils >/dev/null
    else
        echo "bootstrap: qemu-system-x86_64 is missing; install QEMU (package qemu-system-x86)" >&2
    fi
fi
if ! command -v as >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get install -y -qq binutils >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=.venv/.vmmig-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e '.[test]'
    touch "$stamp"
fi
