#!/usr/bin/env bash
# A real one-node Slurm on this machine, for the Slurm executor's tests and CI.
#
#   scripts/slurm-local.sh up       install (if missing), configure and start; wait for the node
#   scripts/slurm-local.sh down     cancel every job, stop slurmd and slurmctld (and munged if
#                                   `up` started it)
#   scripts/slurm-local.sh status   what runs, sinfo and squeue; exit 0 when the node takes jobs
#
# `up` (root only): apt-installs Debian's slurm-wlm and munge when a daemon is missing; writes
# $SLURM_CONF (this host as the one node, CPUs and memory from `slurmd -C`; no cgroups:
# proctrack/linuxproc, task/none; no accounting: there is no slurmdbd, so no `sacct`); creates
# the munge key if there is none; starts munged (as the munge user), slurmctld and slurmd
# directly (no systemd needed), as SlurmUser=root; waits until `sinfo` shows the node usable.
# Idempotent: a second `up` with everything running and the same config returns at once; a
# config that changed (say the memory) is rewritten and the daemons restarted (jobs survive).
# Jobs run as the submitting user (root in CI), in the submit directory, on this file system:
# the workspace is shared by construction.
#
# Env: SLURM_LOCAL_DIR      state, spool, logs and pid files (default /var/lib/slurm-local)
#      SLURM_CONF           the config written and read (default /etc/slurm/slurm.conf, where
#                           sbatch/squeue look without being told)
#      SLURM_LOCAL_TIMEOUT  seconds `up` waits for the node (default 60)
#      SLURM_LOCAL_FORCE=1  overwrite a slurm.conf not written by this script (kept as .bak)
set -euo pipefail

export PATH="$PATH:/usr/sbin:/sbin"
dir="${SLURM_LOCAL_DIR:-/var/lib/slurm-local}"
conf="${SLURM_CONF:-/etc/slurm/slurm.conf}"
export SLURM_CONF="$conf"
timeout="${SLURM_LOCAL_TIMEOUT:-60}"
marker="# Written by fmnist-pipe scripts/slurm-local.sh"
node="$(hostname -s 2>/dev/null || hostname)"

say() { echo "slurm-local: $*" >&2; }
die() { echo "slurm-local: error: $*" >&2; exit 1; }
need_root() { [ "$(id -u)" = 0 ] || die "'$1' needs root (it installs packages and starts daemons)"; }

# pid of a running daemon from its pid file, if the process is that program.
pid_of() { # pidfile program
    local pid
    [ -r "$1" ] || return 1
    pid="$(cat "$1" 2>/dev/null)" || return 1
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] || return 1
    case "$(cat "/proc/$pid/comm" 2>/dev/null)" in "$2"*) echo "$pid" ;; *) return 1 ;; esac
}

stop_pid() { # pidfile program
    local pid i
    pid="$(pid_of "$1" "$2")" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do
        [ -e "/proc/$pid" ] || { say "stopped $2 ($pid)"; return 0; }
        [ "$i" = 50 ] || sleep 0.2
    done
    kill -KILL "$pid" 2>/dev/null || true
    say "killed $2 ($pid)"
}

# The folder the running cluster uses: from the config on disk when this script wrote it (so
# `down` and `status` find the daemons even when SLURM_LOCAL_DIR differs from `up`'s), else $dir.
live_dir() {
    local d=""
    if [ -r "$conf" ] && grep -qF "$marker" "$conf"; then
        d="$(sed -n 's/^SlurmctldPidFile=\(.*\)\/slurmctld\.pid$/\1/p' "$conf")"
    fi
    echo "${d:-$dir}"
}

munge_ok() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }
ctld_ok() { scontrol ping 2>/dev/null | grep -q 'is UP'; }
node_state() { sinfo -h -N -n "$node" -o %T 2>/dev/null | head -n1; }

install_packages() {
    local missing=0 b
    for b in slurmctld slurmd sbatch munged mungekey; do
        command -v "$b" >/dev/null || missing=1
    done
    [ "$missing" = 0 ] && return 0
    command -v apt-get >/dev/null || die "slurm/munge missing and no apt-get: install slurm-wlm and munge"
    say "installing slurm-wlm and munge (apt-get)"
    apt-get update -qq
    # The packages' scripts would start the services (through systemd or init.d, without a
    # slurm.conf yet); a policy-rc.d that says no, for the install only, leaves that to `up`.
    local policy=/usr/sbin/policy-rc.d ours=0 rc=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && ours=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurm-wlm munge >/dev/null || rc=$?
    [ "$ours" = 0 ] || rm -f "$policy"
    [ "$rc" = 0 ] || die "apt-get install slurm-wlm munge failed ($rc)"
}

write_conf() {
    local hw cpus mem tmp defmem
    # slurmd -C: "NodeName=h CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1
    # RealMemory=24105". Memory rounded down to 256 MiB: slurmd drains a node whose memory is
    # below the configured value, and a VM's MemTotal can move a little.
    hw="$(slurmd -C | head -n1)"
    cpus="$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$hw")"
    mem="$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")"
    [[ -n "$cpus" && -n "$mem" ]] || die "cannot read CPUs/RealMemory from 'slurmd -C': $hw"
    if [ "$mem" -gt 512 ]; then mem=$((mem / 256 * 256)); fi
    defmem=$((mem / cpus))
    hw="$(sed -e "s/^NodeName=[^ ]*/NodeName=$node/" -e "s/ RealMemory=[0-9]*/ RealMemory=$mem/" <<<"$hw")"
    tmp="$(mktemp)"
    cat >"$tmp" <<EOF
$marker: a one-node test cluster.
# Regenerated by every 'up' (CPUs and memory from 'slurmd -C'); edit the script, not this file.
ClusterName=fmnistpipe
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$dir/ctld
SlurmdSpoolDir=$dir/slurmd
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
# No cgroups (containers and VMs often do not delegate them), no accounting daemon.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# One line per finished job (JobId, JobState, ExitCode...): for debugging, not for the executor.
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/log/jobcomp.log
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
SchedulerType=sched/backfill
# Refuse at submit (sbatch exits 1) a job no node/partition can ever run, instead of queueing
# it forever with Reason=PartitionConfig.
EnforcePartLimits=ALL
# CPUs and memory are consumable: two 1-CPU jobs run side by side on a 2-CPU node. A job
# without --mem gets DefMemPerCPU per CPU (not the whole node).
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=$defmem
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
# Finished jobs stay visible to squeue -j / scontrol show job for MinJobAge seconds.
MinJobAge=300
KillWait=10
SlurmctldDebug=info
SlurmdDebug=info
$hw NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
    conf_changed=0
    if [ -f "$conf" ] && cmp -s "$tmp" "$conf"; then
        rm -f "$tmp"
        return 0
    fi
    if [ -f "$conf" ] && ! grep -qF "$marker" "$conf"; then
        if [ "${SLURM_LOCAL_FORCE:-}" = 1 ]; then
            cp -p "$conf" "$conf.bak.$(date +%Y%m%d%H%M%S)"
        else
            rm -f "$tmp"
            die "$conf exists and was not written by this script (SLURM_LOCAL_FORCE=1 replaces it, keeping a .bak)"
        fi
    fi
    mkdir -p "$(dirname "$conf")"
    chmod 644 "$tmp"
    mv "$tmp" "$conf"
    conf_changed=1
    say "wrote $conf ($node: $cpus CPUs, $mem MiB)"
}

start_munge() {
    munge_ok && return 0
    [ -s /etc/munge/munge.key ] || {
        say "creating /etc/munge/munge.key"
        install -d -o munge -g munge -m 0700 /etc/munge
        runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
    }
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    rm -f /run/munge/munge.socket.2.lock
    runuser -u munge -- munged
    touch "$dir/munged.ours"
    local i
    for i in $(seq 1 50); do
        munge_ok && { say "munged started"; return 0; }
        sleep 0.2
    done
    die "munged does not answer (see /var/log/munge/munged.log)"
}

up() {
    need_root up
    install_packages
    mkdir -p "$dir/ctld" "$dir/slurmd" "$dir/log"
    local old
    old="$(live_dir)"
    write_conf
    if [ "$conf_changed" = 1 ]; then
        # New config: daemons started with the old one are restarted (running jobs survive when
        # the folder stays the same).
        stop_pid "$old/slurmd.pid" slurmd
        stop_pid "$old/slurmctld.pid" slurmctld
        if [ "$old" != "$dir" ] && [ -e "$old/munged.ours" ]; then
            mv "$old/munged.ours" "$dir/munged.ours"
        fi
    fi
    start_munge
    if ! pid_of "$dir/slurmctld.pid" slurmctld >/dev/null; then
        slurmctld -f "$conf" || die "slurmctld did not start (see $dir/log/slurmctld.log)"
        say "slurmctld started"
    fi
    if ! pid_of "$dir/slurmd.pid" slurmd >/dev/null; then
        slurmd -f "$conf" -N "$node" || die "slurmd did not start (see $dir/log/slurmd.log)"
        say "slurmd started"
    fi
    local start=$SECONDS state=""
    while [ $((SECONDS - start)) -lt "$timeout" ]; do
        if ctld_ok; then
            state="$(node_state)"
            case "$state" in
                idle | mixed | allocated | completing) say "up: node $node is $state"; return 0 ;;
                *drain* | down*)
                    # Left down/drained by an earlier run (killed slurmd, changed memory...).
                    scontrol update NodeName="$node" State=RESUME 2>/dev/null || true ;;
            esac
        fi
        sleep 0.5
    done
    sinfo -N -l >&2 || true
    die "node $node not usable after ${timeout}s (state '${state}'; logs in $dir/log)"
}

down() {
    need_root down
    local i d
    d="$(live_dir)"
    if ctld_ok; then
        if [ -n "$(squeue -h -o %i 2>/dev/null)" ]; then
            say "cancelling all jobs"
            squeue -h -o %i | xargs -r scancel 2>/dev/null || true
            for i in $(seq 1 30); do
                [ -z "$(squeue -h -t PD,R,CG,S -o %i 2>/dev/null)" ] && break
                sleep 0.5
            done
        fi
    fi
    stop_pid "$d/slurmd.pid" slurmd
    stop_pid "$d/slurmctld.pid" slurmctld
    if [ -e "$d/munged.ours" ]; then
        stop_pid /run/munge/munged.pid munged
        rm -f "$d/munged.ours"
    fi
    say "down"
}

status() {
    local ok=0 p d
    d="$(live_dir)"
    if munge_ok; then echo "munged: up"; else echo "munged: down"; ok=1; fi
    for p in slurmctld slurmd; do
        if pid_of "$d/$p.pid" "$p" >/dev/null; then
            echo "$p: running (pid $(pid_of "$d/$p.pid" "$p"))"
        else
            echo "$p: not running"; ok=1
        fi
    done
    if ctld_ok; then
        echo "node $node: $(node_state)"
        case "$(node_state)" in idle | mixed | allocated | completing) ;; *) ok=1 ;; esac
        sinfo
        squeue
    else
        echo "slurmctld does not answer"; ok=1
    fi
    return "$ok"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) die "usage: $0 up|down|status" ;;
esac
