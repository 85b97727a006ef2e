#!/usr/bin/env bash
# bench/setup.sh - install what `make bench` and bench/load.py need on a bare machine.
#
#   bench/setup.sh            # Debian packages nginx-light, wrk, hey, varnish, trafficserver
#                             # + the Glance peer + py-spy and matplotlib in .venv
#
# Idempotent: each step checks first and does nothing when its tool is already there.
# Run as root (apt-get). The Glance peer lives in ../shared (a sibling of the checkout).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
peer=$repo/../shared/peers/glance-peer.sh

log() { printf '[bench-setup] %s\n' "$*" >&2; }

# nginx-light ships /usr/sbin/nginx; wrk and hey ship binaries of the same name;
# varnish ships /usr/sbin/varnishd, trafficserver /usr/bin/traffic_server (the
# proxy scenarios' peers; bench/peers.py runs them itself, never as services).
missing=()
command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || missing+=(nginx-light)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v hey >/dev/null 2>&1 || missing+=(hey)
[[ -x /usr/sbin/varnishd ]] || missing+=(varnish)
[[ -x /usr/bin/traffic_server ]] || missing+=(trafficserver)
if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # The package's own nginx service is of no use here (the benchmark starts
    # its own foreground nginx on a free loopback port); stop it if it started.
    # Likewise Varnish's and Traffic Server's (without systemd, policy-rc.d
    # usually keeps them from starting at all; stop them if they did).
    if command -v service >/dev/null 2>&1; then
        for pkg in nginx-light:nginx varnish:varnish trafficserver:trafficserver; do
            if [[ " ${missing[*]} " == *" ${pkg%%:*} "* ]]; then
                service "${pkg#*:}" stop >/dev/null 2>&1 || true
            fi
        done
    fi
else
    log "nginx, wrk, hey, varnish and trafficserver already installed"
fi

if [[ -x $peer ]] || [[ -f $peer ]]; then
    bash "$peer" install
else
    log "WARNING: $peer not found: the Glance scenarios will be skipped"
fi

# py-spy profiles the service when a target is missed (bench/run.py --profile).
venv=$repo/.venv
if [[ -x $venv/bin/pip ]] && ! [[ -x $venv/bin/py-spy ]]; then
    log "pip install py-spy into $venv"
    "$venv/bin/pip" install -q py-spy 2>&1 | { grep -v 'is ignored' >&2 || true; }
fi
# matplotlib draws the results (bench/plot.py): the project's bench extra.
if [[ -x $venv/bin/pip ]] && ! "$venv/bin/python" -c 'import matplotlib' 2>/dev/null; then
    log "pip install -e '.[bench]' into $venv (matplotlib)"
    "$venv/bin/pip" install -q -e "$repo[bench]" 2>&1 | { grep -v 'is ignored' >&2 || true; }
fi
log "ready: nginx=$(command -v nginx || echo /usr/sbin/nginx) wrk=$(command -v wrk) hey=$(command -v hey)" \
    "varnishd=/usr/sbin/varnishd traffic_server=/usr/bin/traffic_server"
