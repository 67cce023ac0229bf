#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: the Fashion-MNIST Debian package, a virtualenv in .venv,
# and this package with its dev tools. torch/torchvision are pinned to the wheels on local disk.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
if ! .venv/bin/python -c "import twist_hf" 2>/dev/null || [ pyproject.toml -nt .venv/.twist-installed ]; then
  .venv/bin/pip install -q -e ".[dev]"
  touch .venv/.twist-installed
fi
