#!/usr/bin/env bash
# Set up everything napari-medvision needs on a fresh machine, idempotently:
# system libraries Qt needs under Xvfb (Debian/Ubuntu, when root), a virtual environment in
# .venv with torch pinned, and the project itself (editable) with napari and test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_PIN="torch==2.14.1 torchvision==0.29.1"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
VENV=".venv"
STAMP="$VENV/.medvision-setup"

need_apt=()
command -v Xvfb >/dev/null 2>&1 || need_apt+=(xvfb xauth)
for lib in libxkbcommon-x11.so.0 libxcb-icccm.so.4 libxcb-image.so.0 libxcb-keysyms.so.1 libxcb-randr.so.0 \
           libxcb-render-util.so.0 libxcb-xinerama.so.0 libxcb-shape.so.0 libxcb-cursor.so.0 libGL.so.1 \
           libEGL.so.1 libfontconfig.so.1 libdbus-1.so.3; do
  ldconfig -p 2>/dev/null | grep -q "$lib" || need_apt+=("$lib")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing system packages for Qt under Xvfb"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends xvfb xauth \
      libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 \
      libxcb-xinerama0 libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 libgl1 libegl1 libfontconfig1 \
      libdbus-1-3 >/dev/null
  else
    echo "setup: missing system libraries (${need_apt[*]}); install them (Debian: xvfb libxcb-* libgl1) for napari" >&2
  fi
fi

want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
# pip warns about every missing entry of this machine's local package indexes: not our concern.
quiet_pip() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
quiet_pip install -q --upgrade pip >/dev/null
echo "setup: installing $TORCH_PIN (pinned) and the project into $VENV"
quiet_pip install -q $TORCH_PIN
quiet_pip install -q -e ".[napari,ml,test]"
echo "$want" > "$STAMP"
