#!/usr/bin/env bash
# Set up a fresh Debian machine for the test suite, then run it.
#
#   bash tests/run.sh            the whole suite, as CI runs it
#   bash tests/run.sh -k copy    extra arguments go to pytest
#
# Installs the Debian packages the tests drive (skopeo, umoci, gnupg, chromium,
# btrfs-progs for a file system that makes reflinks), and python3-venv when
# `python3 -m venv` lacks the ensurepip it needs, when run as root or with sudo;
# makes a virtualenv in .venv, installs the project with its test extra, and runs
# pytest. Tests start and stop their own servers.
set -euo pipefail
cd "$(dirname "$0")/.."

debian_packages=(skopeo umoci gnupg chromium util-linux btrfs-progs)
# Debian's python3 keeps ensurepip, without which `python3 -m venv` fails, in
# python3-venv; a Python built elsewhere (pyenv, a container image) has its own.
python3 -c 'import ensurepip' 2>/dev/null || debian_packages+=(python3-venv)
missing=()
for package in "${debian_packages[@]}"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "installing Debian packages: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive \
        $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# A regular install, not an editable one: a Dask worker puts its scratch folder,
# which holds a `storage` subfolder, first on sys.path, and an editable install's
# import hook is asked only after every sys.path entry, so workers would import
# that empty folder. An installed package on sys.path wins over it. Installing on
# every run keeps the installed copy equal to the checkout.
.venv/bin/python -m pip install -q '.[test]'

exec .venv/bin/python -m pytest "$@"
