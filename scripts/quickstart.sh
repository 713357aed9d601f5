#!/usr/bin/env bash
# Quick start, command 1: set up, then run the main job on the shipped sample data.
# Writes demo_output/ (the sample CT, its labels, a napari screenshot, a JSON summary).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -z "${DISPLAY:-}" ] && command -v xvfb-run >/dev/null; then
  exec xvfb-run -a -s "-screen 0 1280x1024x24" .venv/bin/medvision demo -o demo_output "$@"
fi
exec .venv/bin/medvision demo -o demo_output "$@"
