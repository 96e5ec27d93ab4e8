#!/bin/sh
# Install what tests/test_browser.py drives: Debian's Chromium at /usr/bin/chromium.
# Playwright for Python (in the test extra) is pointed at it; Playwright's own
# browser download is never used. Does nothing when Chromium is already there.
set -eu
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
else
    echo "install-browser: not root and no sudo: install Debian's chromium package by hand," >&2
    echo "install-browser: or the browser test will be skipped (it fails when CI is set)" >&2
    exit 0
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium
