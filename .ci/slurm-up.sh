#!/usr/bin/env bash
# Start a one-node Slurm cluster on this machine, by hand (no systemd): for tests/test_slurm.py and CI.
#
#   sudo .ci/slurm-up.sh          # idempotent: installs what is missing, starts what is not running
#
# Installs Debian's slurm-wlm and munge when missing (apt-get update first), writes a munge key
# (mode 400, owner munge) and starts munged, writes /etc/slurm/slurm.conf for this host (its real
# CPUs and memory from `slurmd -C`, select/cons_tres, proctrack/linuxproc, task/none, no accounting
# storage, MinJobAge 600) and starts slurmctld and slurmd, then waits until the node is idle.
# Without an accounting database `sacct` cannot answer: point Snakemake's Slurm executor at squeue
# (`slurm-status-command: squeue`, `slurm-no-account: true`), as tests/test_slurm.py does.
set -euo pipefail

log() { echo "slurm-up: $*" >&2; }
die() { log "$*"; exit 1; }

if [ "$(id -u)" -ne 0 ]; then
    # CI runners are often a user with password-less sudo.
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then exec sudo -n bash "$0" "$@"; fi
    die "must run as root (it installs packages and starts daemons)"
fi

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
MARK="# written by .ci/slurm-up.sh"

# 1. Packages.
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
    log "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # No init system here: keep the packages' postinst from trying to start services.
    policy=/usr/sbin/policy-rc.d; made_policy=0
    if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; made_policy=1; fi
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
    if [ "$made_policy" -eq 1 ]; then rm -f "$policy"; fi
fi

# 2. Munge: a key readable by munge only, then the daemon.
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    log "creating the munge key"
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "starting munged"
    rm -f /run/munge/munge.socket.2 /run/munge/munged.pid
    runuser -u munge -- munged
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
    munge -n | unmunge >/dev/null || die "munged did not start; see /var/log/munge/munged.log"
fi

# 3. slurm.conf for this host: its real CPUs and memory as slurmd itself reports them.
HOST=$(hostname -s)
NODE_LINE=$(slurmd -C | grep '^NodeName=' | head -n1)
[ -n "$NODE_LINE" ] || die "slurmd -C did not report this node"
install -d -m 0755 "$CONF_DIR"
install -d -o slurm -g slurm -m 0755 /var/spool/slurmctld /var/log/slurm
install -d -m 0755 /var/spool/slurmd /run/slurm
chown slurm:slurm /run/slurm
new_conf=$(cat <<EOF
$MARK
ClusterName=echochamber
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
MinJobAge=600
SlurmctldTimeout=60
SlurmdTimeout=60
$NODE_LINE NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=main Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
)
conf_changed=0
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$new_conf" ]; then
    if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script; not overwriting it"
    fi
    printf '%s\n' "$new_conf" >"$CONF"
    conf_changed=1
fi

# 4. The daemons (restarted when the config changed under them).
running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if [ "$conf_changed" -eq 1 ]; then
    for pidf in /run/slurm/slurmd.pid /run/slurm/slurmctld.pid; do
        if running "$pidf"; then kill "$(cat "$pidf")"; sleep 1; fi
    done
fi
if ! running /run/slurm/slurmctld.pid; then log "starting slurmctld"; slurmctld; fi
if ! running /run/slurm/slurmd.pid; then log "starting slurmd"; slurmd; fi

# 5. Wait for the node to accept jobs.
state=""
for _ in $(seq 60); do
    state=$(sinfo -h -n "$HOST" -o '%T' 2>/dev/null | head -n1 || true)
    case "$state" in
        idle|mixed|allocated|completing) break ;;
        down*|drain*|fail*) scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 1
done
case "$state" in
    idle|mixed|allocated|completing) log "node $HOST is $state: sbatch is ready" ;;
    *) die "node $HOST is '${state:-unknown}' after 60 s; see /var/log/slurm/slurmctld.log and slurmd.log" ;;
esac
