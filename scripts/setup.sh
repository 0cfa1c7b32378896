#!/usr/bin/env bash
# Create .venv with the pinned requirements and Switchyard installed editable (idempotent). Source it to get the environment:
#   source scripts/setup.sh
# torch==2.13.0 is pinned: an unpinned torch pulls a multi-GB CUDA build. On a GPU cluster install
# the CUDA build of the same version first (see README), then this script keeps it.
set -e
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ ! -x "$REPO/.venv/bin/python" ] || ! cmp -s "$REPO/requirements.txt" "$REPO/.venv/requirements.installed"; then
  python3 -m venv "$REPO/.venv"
  "$REPO/.venv/bin/pip" install -q --disable-pip-version-check -r "$REPO/requirements.txt"
  cp "$REPO/requirements.txt" "$REPO/.venv/requirements.installed"
fi
# Switchyard itself, editable (imports read this checkout), so entry points run by path from any directory.
# Again when pyproject.toml changes, since its package list is baked into the install.
if ! cmp -s "$REPO/pyproject.toml" "$REPO/.venv/pyproject.installed"; then
  "$REPO/.venv/bin/pip" install -q --disable-pip-version-check --no-deps -e "$REPO"
  cp "$REPO/pyproject.toml" "$REPO/.venv/pyproject.installed"
fi
export PATH="$REPO/.venv/bin:$PATH"
# DeepSpeed JIT-builds its CPU ops (Adam, shared-memory comm) on first use (2-3 min here): keep them.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$REPO/.torch_extensions}"
# W&B never needs the network: offline unless the user has set an API key.
if [ -z "${WANDB_API_KEY:-}" ]; then export WANDB_MODE="${WANDB_MODE:-offline}"; fi
set +e
