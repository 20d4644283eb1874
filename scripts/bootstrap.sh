#!/usr/bin/env bash
# Install what regdpo needs on a fresh machine: ffmpeg (apt, when root; chromium for the tests),
# a venv with the CPU torch build and the project with its dev extras.
# Idempotent: re-runs only when pyproject changes.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${REGDPO_VENV:-.venv}
TORCH=${REGDPO_TORCH:-torch==2.13.0}   # the local CPU wheel here; set e.g. torch==2.x+cu12x on GPU machines
PY=${PYTHON:-python3}

need_apt=()
command -v ffmpeg >/dev/null 2>&1 && command -v ffprobe >/dev/null 2>&1 || need_apt+=(ffmpeg)
# opencv-python (required by scenedetect and rapidocr) loads libGL and glib at import.
ldconfig -p 2>/dev/null | grep -q 'libGL.so.1' || need_apt+=(libgl1)
ldconfig -p 2>/dev/null | grep -q 'libglib-2.0.so.0' || need_apt+=(libglib2.0-0)
# Only the tests need these: the GSB page's browser test drives Debian's chromium through its
# chromedriver (Selenium; nothing is downloaded). Without root they are reported, not required.
want_apt=()
command -v chromium >/dev/null 2>&1 || want_apt+=(chromium)
command -v chromedriver >/dev/null 2>&1 || want_apt+=(chromium-driver)
if ((${#need_apt[@]} + ${#want_apt[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "bootstrap: apt-get install ${need_apt[*]} ${want_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${need_apt[@]}" "${want_apt[@]}" >/dev/null
  elif ((${#need_apt[@]})); then
    echo "bootstrap: missing system packages: ${need_apt[*]}." >&2
    echo "  Install them (e.g. 'sudo apt-get install ${need_apt[*]} ${want_apt[*]}') and run this again." >&2
    exit 1
  else
    echo "bootstrap: the GSB browser test needs ${want_apt[*]}: 'sudo apt-get install ${want_apt[*]}'" >&2
  fi
fi

stamp="$VENV/.regdpo-installed"
want="$(sha256sum pyproject.toml | cut -c1-16) $TORCH"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$TORCH"
"$VENV/bin/python" -m pip install -q -e ".[dev]"
if "$VENV/bin/python" -c "import torchvision" 2>/dev/null; then
  echo "bootstrap: removing torchvision (no CPU build here; it breaks transformers' imports)"
  "$VENV/bin/python" -m pip uninstall -q -y torchvision
fi
echo "$want" > "$stamp"
echo "bootstrap: ready ($VENV)"
