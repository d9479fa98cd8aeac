#!/usr/bin/env bash
# The Debian package builds, installs with dpkg, its units pass `systemd-analyze verify` with the
# binaries in place, and it removes cleanly. Run as root by scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/package.sh
deb=$(ls -t target/debian/wglb_*.deb | head -n1)
dpkg-deb --info "$deb"
dpkg -i "$deb"
trap 'dpkg -r wglb >/dev/null 2>&1 || true' EXIT
test -x /usr/bin/wglb && test -x /usr/bin/wglb-healthcheck
getent group wglb >/dev/null
/usr/bin/wglb check-config /usr/share/doc/wglb/examples/wglb.example.toml >/dev/null
systemd-analyze verify /lib/systemd/system/wglb.service /lib/systemd/system/wglb-healthcheck.service
dpkg -r wglb
trap - EXIT
test ! -e /usr/bin/wglb
echo "package: built, installed, units verified, removed: $(basename "$deb")"
