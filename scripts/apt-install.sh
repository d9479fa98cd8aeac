#!/usr/bin/env bash
# Installs those of the given Debian packages that are not installed yet (and runs apt-get update
# only then). --no-install-recommends: wireguard-tools would otherwise pull in a kernel image and
# systemd.
set -euo pipefail
missing=()
for package in "$@"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
    # Installing a daemon (keepalived, bird2, nginx) must not start it on this host: the lab and
    # the benchmarks start their own, in namespaces.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
