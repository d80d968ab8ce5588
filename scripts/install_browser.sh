#!/bin/sh
# Headless Chromium + chromedriver for the web-UI browser test (tests/test_ui.py). Debian packages; needs root.
set -eu
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    echo "chromium and chromedriver already installed"
    exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends chromium chromium-driver
