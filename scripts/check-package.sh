#!/usr/bin/env bash
# The Debian package builds, installs with dpkg, its units pass `systemd-analyze verify` and its
# keepalived example `keepalived --config-test` with the binaries in place, its BIRD examples
# parse, and it removes
# cleanly. Run as root by scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/package.sh
deb=$(ls -t target/debian/wglb_*.deb | head -n1)
dpkg-deb --info "$deb"
dpkg -i "$deb"
trap 'dpkg -r wglb >/dev/null 2>&1 || true' EXIT
test -x /usr/bin/wglb && test -x /usr/bin/wglb-healthcheck && test -x /usr/bin/wglb-agent
/usr/bin/wglb-agent --version >/dev/null
getent group wglb >/dev/null
/usr/bin/wglb check-config /usr/share/doc/wglb/examples/wglb.example.toml >/dev/null
test -x /usr/lib/wglb/keepalived-notify
# The shipped keepalived configuration, with the installed wglb and notify hook in place.
keepalived --config-test -f /usr/share/doc/wglb/examples/keepalived.conf
# The BIRD examples for active-active sites parse (bird -p checks a file and exits).
for example in bird-balancer bird-router; do
    bird -p -c "/usr/share/doc/wglb/examples/$example.conf"
done
systemd-analyze verify /lib/systemd/system/wglb.service /lib/systemd/system/wglb-healthcheck.service \
    /lib/systemd/system/wglb-agent.service
dpkg -r wglb
trap - EXIT
test ! -e /usr/bin/wglb
echo "package: built, installed, units verified, removed: $(basename "$deb")"
