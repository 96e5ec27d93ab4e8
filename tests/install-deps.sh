#!/bin/sh
# Install what the tests run outside the virtual environment, from Debian:
# - chromium at /usr/bin/chromium, which tests/test_browser.py drives through
#   Playwright for Python (Playwright's own browser download is never used);
# - redis-server at /usr/bin/redis-server, which the Redis tests start as
#   their own throwaway servers on free ports (tests/redis_support.py): as
#   primaries, replicas, and Sentinels too (`redis-server CONF --sentinel`,
#   the same binary that Debian's redis-sentinel package only links to, so
#   tests/test_sentinel.py needs no other package).
# Each is checked on its own and only what is missing is installed, with one
# `apt-get update` before; with all there, nothing runs. And for the docs'
# tests (tests/test_docs*.py), which run what the docs tell an operator to:
# curl at /usr/bin/curl, nginx at /usr/sbin/nginx (nginx -t, then a real
# nginx in front of real servers), logrotate at /usr/sbin/logrotate and
# sysctl (procps) at /usr/sbin/sysctl.
# This script starts no service itself: the tests start the redis-server and
# nginx they use; apt starts the packages' own services only where an init
# system runs (systemd), and the tests do not use those.
# Without root or sudo it says what to install by hand and exits 0: the tests
# that need a missing program are then skipped, unless CI is set (then they fail).
# INSTALL_DEPS_ROOT, if set, is prefixed to the checked paths
# (tests/test_install_deps.py only).
set -eu
root=${INSTALL_DEPS_ROOT:-}
missing=""
for wanted in chromium:/usr/bin/chromium redis-server:/usr/bin/redis-server \
    curl:/usr/bin/curl nginx:/usr/sbin/nginx logrotate:/usr/sbin/logrotate \
    procps:/usr/sbin/sysctl; do
    if [ ! -x "$root${wanted#*:}" ]; then
        missing="$missing ${wanted%%:*}"
    fi
done
if [ -z "$missing" ]; then
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
else
    echo "install-deps: not root and no sudo: install Debian's$missing by hand" \
        "(apt-get install$missing)," >&2
    echo "install-deps: or the tests that need them will be skipped (they fail when CI is set)" >&2
    exit 0
fi
echo "install-deps: installing$missing" >&2
$SUDO apt-get update -qq
# Through env: sudo's env_reset would drop a variable set in front of it.
# shellcheck disable=SC2086  # $missing is a list of package names
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing
