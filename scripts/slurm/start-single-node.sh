#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine (Debian's slurm-wlm + munge), for the SLURM executor
# test and for trying `snakemake --workflow-profile workflow/profiles/slurm` locally.
#
#   scripts/slurm/start-single-node.sh            # install if needed, configure, start; idempotent
#   scripts/slurm/start-single-node.sh --check    # only report whether a cluster answers (exit 0/1)
#   scripts/slurm/stop-single-node.sh             # stop what this script started
#
# Exit status: 0 = a cluster answers and its node accepts jobs; 77 = this machine cannot run one (not
# root, or slurm missing and no apt-get): the SLURM tests skip; anything else = a real failure.
# It writes /etc/slurm/slurm.conf (marked as ours) and never touches a configuration it did not write:
# where another SLURM cluster already answers, it leaves it alone and exits 0.
#
# Node: the real hostname, CPUs and topology from `slurmd -C`, RealMemory = MemTotal minus 5 %
# (/proc/meminfo); partition `cpu` (default) and, only where `nvidia-smi -L` lists GPUs, a `gpu`
# partition with Gres=gpu:N. MinJobAge=600 keeps finished jobs visible to `squeue`, which the snakemake
# SLURM plugin uses for job status here (there is no slurmdbd, so no `sacct`).
set -euo pipefail

MARK="# written by lmkiln scripts/slurm/start-single-node.sh"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
STATE=/run/lmkiln-slurm          # pid files of the daemons this script started
LOG_DIR=/var/log/slurm
WAIT_S=${LMKILN_SLURM_WAIT_S:-60}

log() { echo "slurm-single-node: $*" >&2; }
cannot() { log "cannot start a SLURM cluster here: $*"; exit 77; }

node_state() {  # state of this cluster's node(s), empty if slurmctld does not answer
    timeout 5 sinfo -h -o '%T' 2>/dev/null | sort -u | tr '\n' ' ' || true
}
answers() {  # a node accepts jobs (idle/mixed/allocated/completing)
    [[ "$(node_state)" =~ (idle|mix|alloc|completing) ]]
}

if [[ "${1:-}" == "--check" ]]; then
    command -v sinfo >/dev/null && answers && { log "up: $(node_state)"; exit 0; }
    log "no SLURM cluster answers"; exit 1
fi

if command -v sinfo >/dev/null && answers && ! grep -qF "$MARK" "$CONF" 2>/dev/null; then
    log "a SLURM cluster not configured by this script already answers ($(node_state)); using it"
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    command -v sinfo >/dev/null && answers && { log "up: $(node_state)(not root: left as it is)"; exit 0; }
    cannot "needs root (daemons, /etc/slurm); run it with sudo"
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
    || ! command -v sbatch >/dev/null; then
    command -v apt-get >/dev/null || cannot "slurm-wlm/munge are not installed and there is no apt-get"
    log "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null 2>&1 \
        || { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null; }
fi

if [[ -f "$CONF" ]] && ! grep -qF "$MARK" "$CONF"; then
    log "$CONF exists and was not written by this script; not overwriting it (move it away to use this)"
    exit 1
fi

mkdir -p "$STATE" "$LOG_DIR" "$CONF_DIR" /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /run/slurm
SLURM_USER=root
if id slurm >/dev/null 2>&1; then
    SLURM_USER=slurm
    chown slurm:slurm /var/lib/slurm/slurmctld "$LOG_DIR" /run/slurm
fi

# --- munge: the key, its run directory, the daemon --------------------------------------------------
if ! id munge >/dev/null 2>&1; then
    cannot "the munge user is missing (reinstall the munge package)"
fi
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null; then mungekey --create --force --keyfile /etc/munge/munge.key
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
fi
chown munge:munge /etc/munge /etc/munge/munge.key
chmod 0700 /etc/munge
chmod 0400 /etc/munge/munge.key
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "starting munged"
    setsid runuser -u munge -- /usr/sbin/munged --force </dev/null >>"$LOG_DIR/munged.out" 2>&1
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || { log "munged does not answer (see /var/log/munge/munged.log)"; exit 1; }
    cp /run/munge/munged.pid "$STATE/munged.pid" 2>/dev/null || pgrep -u munge -x munged >"$STATE/munged.pid"
fi

# --- slurm.conf: this host, its CPUs and memory, a gpu partition only where GPUs exist --------------
HOST=$(hostname -s)
TOPOLOGY=$(slurmd -C | head -n1 | grep -oE '(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=[0-9]+' \
    | tr '\n' ' ')
MEM_MB=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.95}' /proc/meminfo)
NGPU=0
if command -v nvidia-smi >/dev/null; then NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
GRES_NODE="" GRES_TYPES=""
if (( NGPU > 0 )); then
    GRES_NODE="Gres=gpu:$NGPU"
    GRES_TYPES="GresTypes=gpu"
    {
        echo "$MARK"
        echo "NodeName=$HOST Name=gpu File=/dev/nvidia[0-$((NGPU - 1))]"
    } >"$CONF_DIR/gres.conf.tmp"
    mv "$CONF_DIR/gres.conf.tmp" "$CONF_DIR/gres.conf"
fi
cat >"$CONF.tmp" <<EOF
$MARK
ClusterName=lmkiln
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=$SLURM_USER
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MinJobAge=600
SlurmdTimeout=60
$GRES_TYPES
NodeName=$HOST NodeAddr=127.0.0.1 $TOPOLOGY RealMemory=$MEM_MB $GRES_NODE State=UNKNOWN
PartitionName=cpu Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
if (( NGPU > 0 )); then
    echo "PartitionName=gpu Nodes=$HOST MaxTime=INFINITE State=UP" >>"$CONF.tmp"
fi
CHANGED=1
if cmp -s "$CONF.tmp" "$CONF"; then CHANGED=0; rm "$CONF.tmp"; else mv "$CONF.tmp" "$CONF"; fi

alive() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# --- daemons: restart them when the configuration changed ------------------------------------------
if (( CHANGED )); then
    for d in slurmd slurmctld; do
        if alive "/run/slurm/$d.pid"; then log "config changed: stopping $d"; kill "$(cat "/run/slurm/$d.pid")"; fi
    done
    for _ in $(seq 50); do alive /run/slurm/slurmd.pid || alive /run/slurm/slurmctld.pid || break; sleep 0.2; done
fi
if ! alive /run/slurm/slurmctld.pid; then
    log "starting slurmctld"
    setsid /usr/sbin/slurmctld </dev/null >>"$LOG_DIR/slurmctld.out" 2>&1
fi
if ! alive /run/slurm/slurmd.pid; then
    log "starting slurmd"
    setsid /usr/sbin/slurmd </dev/null >>"$LOG_DIR/slurmd.out" 2>&1
fi
touch "$STATE/slurm.started"

for _ in $(seq $((WAIT_S * 2))); do
    answers && break
    state=$(node_state)
    if [[ "$state" =~ (down|drain) ]]; then
        scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
    fi
    sleep 0.5
done
if ! answers; then
    log "the node did not become ready in ${WAIT_S}s (state: '$(node_state)'); see $LOG_DIR/slurmctld.log, slurmd.log"
    exit 1
fi
log "up: node $HOST ($TOPOLOGY RealMemory=$MEM_MB${GRES_NODE:+ $GRES_NODE}), partitions: $(sinfo -h -o '%P' | tr '\n' ' ')"
