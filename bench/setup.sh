#!/usr/bin/env bash
# bench/setup.sh - install what `make bench` and bench/load.py need on a bare machine.
#
#   bench/setup.sh            # Debian packages nginx-light, wrk, hey + the Glance peer + py-spy
#
# Idempotent: each step checks first and does nothing when its tool is already there.
# Run as root (apt-get). The Glance peer lives in ../shared (a sibling of the checkout).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
peer=$repo/../shared/peers/glance-peer.sh

log() { printf '[bench-setup] %s\n' "$*" >&2; }

# nginx-light ships /usr/sbin/nginx; wrk and hey ship binaries of the same name.
missing=()
command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || missing+=(nginx-light)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v hey >/dev/null 2>&1 || missing+=(hey)
if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # The package's own nginx service is of no use here (the benchmark starts
    # its own foreground nginx on a free loopback port); stop it if it started.
    if [[ " ${missing[*]} " == *" nginx-light "* ]] && command -v service >/dev/null 2>&1; then
        service nginx stop >/dev/null 2>&1 || true
    fi
else
    log "nginx, wrk and hey already installed"
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
log "ready: nginx=$(command -v nginx || echo /usr/sbin/nginx) wrk=$(command -v wrk) hey=$(command -v hey)"
