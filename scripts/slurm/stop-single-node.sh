#!/usr/bin/env bash
# Stop the single-node SLURM cluster that scripts/slurm/start-single-node.sh started (only its daemons:
# a cluster configured by someone else is left alone). Idempotent.
set -euo pipefail

MARK="# written by lmkiln scripts/slurm/start-single-node.sh"
STATE=/run/lmkiln-slurm

log() { echo "slurm-single-node: $*" >&2; }

if ! grep -qF "$MARK" /etc/slurm/slurm.conf 2>/dev/null || [[ ! -d "$STATE" ]]; then
    log "no cluster started by start-single-node.sh here; nothing to stop"
    exit 0
fi

stop_pidfile() {  # stop_pidfile NAME PIDFILE: SIGTERM, then wait up to 10 s
    local name=$1 pidfile=$2 pid
    [[ -s "$pidfile" ]] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        log "stopping $name ($pid)"
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && { log "$name ($pid) ignored SIGTERM; sending SIGKILL"; kill -9 "$pid"; }
    fi
    return 0
}

if [[ -f "$STATE/slurm.started" ]]; then
    stop_pidfile slurmd /run/slurm/slurmd.pid
    stop_pidfile slurmctld /run/slurm/slurmctld.pid
    rm -f "$STATE/slurm.started"
fi
if [[ -f "$STATE/munged.pid" ]]; then
    stop_pidfile munged "$STATE/munged.pid"
    rm -f "$STATE/munged.pid"
fi
log "stopped"
