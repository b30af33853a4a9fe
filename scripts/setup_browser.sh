#!/usr/bin/env bash
# Idempotently install what the real-browser test (tests/e2e/test_browser.py) needs:
#   /usr/bin/chromium, /usr/bin/chromedriver   Debian's chromium + chromium-driver (apt-get)
#   selenium (pinned) in .venv/                 driven at /usr/bin/chromedriver, never a
#                                               downloaded driver (no Selenium Manager)
# Run after scripts/setup_env.sh (it needs .venv/); `make test-slow` runs both.
# Re-running only fills in what is missing; on a ready machine it takes a second.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
SELENIUM_VERSION="4.51.0"  # 4.52.0 needs a certifi newer than the registry serves here
vpy="$root/.venv/bin/python"

if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  echo "[setup_browser] installing Debian's chromium + chromium-driver (first run only)"
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
      sudo="sudo"
    else
      echo "[setup_browser] need root (or sudo) to apt-get install chromium chromium-driver" >&2
      exit 1
    fi
  fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -q
  # fonts-dejavu-core: a font for the UI's fallback text; without any font the screenshots
  # would show boxes (already there on most images, then a no-op).
  $sudo apt-get install -y -q --no-install-recommends chromium chromium-driver fonts-dejavu-core
fi
for bin in /usr/bin/chromium /usr/bin/chromedriver; do
  [ -x "$bin" ] || { echo "[setup_browser] $bin is still missing after apt-get" >&2; exit 1; }
done

if [ ! -x "$vpy" ]; then
  echo "[setup_browser] $vpy not found; run scripts/setup_env.sh (or make setup) first" >&2
  exit 1
fi
if ! "$vpy" -c "import sys, selenium; sys.exit(selenium.__version__ != '$SELENIUM_VERSION')" 2>/dev/null; then
  echo "[setup_browser] installing selenium==$SELENIUM_VERSION into .venv"
  "$vpy" -m pip install -q "selenium==$SELENIUM_VERSION"
fi
echo "[setup_browser] ready: $(/usr/bin/chromium --version 2>/dev/null | head -1), $(/usr/bin/chromedriver --version 2>/dev/null | cut -d' ' -f1-2), selenium $SELENIUM_VERSION"
