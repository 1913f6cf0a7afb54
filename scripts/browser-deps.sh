#!/usr/bin/env bash
# The browser tests (tests/service/test_browser.py) drive Debian's chromium through chromium-driver; install
# them when missing. Root and apt-get are needed (CI runs as root); elsewhere this only says what is missing
# and the browser tests skip with that reason. Nothing here downloads a browser of its own.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian's chromium and chromium-driver for the browser tests ..."
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver
else
  echo "note: chromium/chromium-driver are missing and cannot be installed here (need root + apt-get):" \
       "the browser tests will skip. Install them with: sudo apt-get install -y chromium chromium-driver" >&2
fi
