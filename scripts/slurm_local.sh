#!/bin/bash
# A single-node SLURM on localhost, from Debian's packages: for CI and for trying the
# cluster scripts (scripts/slurm_mpi.sbatch, scripts/ipp_slurm.py) on one machine.
#
#   apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge
#   sudo scripts/slurm_local.sh start     # munged, slurmctld, slurmd; waits for the node
#   sbatch --nodes=1 --ntasks-per-node=2 scripts/slurm_mpi.sbatch allreduce --dataset digits
#   sudo scripts/slurm_local.sh status    # daemons, node state, queue
#   sudo scripts/slurm_local.sh stop      # cancels the jobs, stops the daemons
#
# Everything runs as root (munged, slurmctld, slurmd: the setup seen working in
# containers, where no systemd starts them). The node is this machine as `slurmd -C`
# sees it (CPUs, sockets, cores, memory); processes are tracked without cgroups
# (proctrack/linuxproc, task/none), so it works in a container too. State, spool,
# logs and pid files live in $SLURM_LOCAL_DIR (default /var/tmp/cnn-slurm).
# The config is /etc/slurm/slurm.conf, where sbatch/srun/squeue look by default; a
# slurm.conf this script did not write is never replaced (point SLURM_CONF elsewhere).
# Exit status: 0 when the action worked, 1 with a message naming what did not.
set -euo pipefail

ACTION=${1:-status}
DIR=${SLURM_LOCAL_DIR:-/var/tmp/cnn-slurm}
CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
MARK="# written by scripts/slurm_local.sh"
PARTITION=${SLURM_LOCAL_PARTITION:-debug}
export SLURM_CONF=$CONF

die() { echo "slurm_local: $*" >&2; exit 1; }

need_root() {
    [[ "$(id -u)" == 0 ]] || die "$ACTION needs root (munged, slurmctld and slurmd run as root)"
}

need_packages() {
    local missing=()
    for b in munged slurmctld slurmd sbatch scontrol sinfo; do
        command -v "$b" >/dev/null 2>&1 || missing+=("$b")
    done
    ((${#missing[@]} == 0)) || die "not installed: ${missing[*]}; run: apt-get install -y \
--no-install-recommends slurmctld slurmd slurm-client munge"
}

pid_alive() {  # pid_alive FILE: the pid in FILE is a live process
    [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

write_conf() {
    if [[ -e "$CONF" ]] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script; not replacing it (set \
SLURM_CONF=/some/other/slurm.conf to use this script's config)"
    fi
    local node host
    node=$(slurmd -C | head -n 1)  # NodeName=<host> CPUs=.. Boards=.. ... RealMemory=..
    [[ "$node" == NodeName=* ]] || die "slurmd -C did not describe this node: $node"
    host=$(hostname -s)
    mkdir -p "$(dirname "$CONF")" "$DIR/state" "$DIR/spool"
    cat >"$CONF.tmp" <<EOF
$MARK: a single-node SLURM on localhost
ClusterName=cnnlocal
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
InactiveLimit=0
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

start_munge() {
    if pid_alive /run/munge/munged.pid; then
        return
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    [[ -s /etc/munge/munge.key ]] || {
        command -v mungekey >/dev/null 2>&1 && mungekey --create --force
    } || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown -R root:root /etc/munge /run/munge /var/log/munge /var/lib/munge
    chmod 0700 /etc/munge /var/lib/munge
    chmod 0400 /etc/munge/munge.key
    chmod 0755 /run/munge
    munged --force || die "munged did not start (see /var/log/munge/munged.log)"
    for _ in $(seq 50); do
        [[ -S /run/munge/munge.socket.2 ]] && return
        sleep 0.1
    done
    die "munged started but /run/munge/munge.socket.2 never appeared"
}

node_state() {
    sinfo -h -N -o '%T' 2>/dev/null | head -n 1
}

start() {
    need_root
    need_packages
    write_conf
    start_munge
    pid_alive "$DIR/slurmctld.pid" || slurmctld || die "slurmctld did not start (see \
$DIR/slurmctld.log)"
    for _ in $(seq 100); do
        scontrol ping >/dev/null 2>&1 && break
        sleep 0.2
    done
    scontrol ping >/dev/null 2>&1 || die "slurmctld does not answer (see $DIR/slurmctld.log)"
    pid_alive "$DIR/slurmd.pid" || slurmd || die "slurmd did not start (see $DIR/slurmd.log)"
    local state=""
    for _ in $(seq 150); do
        state=$(node_state)
        case "$state" in
            idle*|mixed*|allocated*) break ;;
            down*|drain*) scontrol update NodeName="$(hostname -s)" State=RESUME \
                              >/dev/null 2>&1 || true ;;
        esac
        sleep 0.2
    done
    case "$state" in
        idle*|mixed*|allocated*) ;;
        *) die "the node did not come up (state: ${state:-none}; see $DIR/slurmd.log)" ;;
    esac
    echo "slurm_local: up: node $(hostname -s) ($state), $(sinfo -h -o '%C' | \
awk -F/ '{print $4}') CPUs, partition $PARTITION, config $CONF, logs in $DIR"
}

stop_daemon() {  # stop_daemon NAME PIDFILE
    local pidfile=$2 pid
    pid_alive "$pidfile" || return 0
    pid=$(cat "$pidfile")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    echo "slurm_local: $1 (pid $pid) did not stop on SIGTERM; killed" >&2
}

stop() {
    need_root
    if [[ -f "$CONF" ]] && scontrol ping >/dev/null 2>&1; then
        local jobs
        jobs=$(squeue -h -o '%i' 2>/dev/null || true)
        if [[ -n "$jobs" ]]; then
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for _ in $(seq 100); do
                [[ -z "$(squeue -h -o '%i' 2>/dev/null)" ]] && break
                sleep 0.2
            done
        fi
    fi
    stop_daemon slurmd "$DIR/slurmd.pid"
    stop_daemon slurmctld "$DIR/slurmctld.pid"
    stop_daemon munged /run/munge/munged.pid
    echo "slurm_local: stopped"
}

status() {
    local rc=0
    for d in "munged:/run/munge/munged.pid" "slurmctld:$DIR/slurmctld.pid" \
             "slurmd:$DIR/slurmd.pid"; do
        if pid_alive "${d#*:}"; then
            echo "${d%%:*}: running (pid $(cat "${d#*:}"))"
        else
            echo "${d%%:*}: not running"
            rc=1
        fi
    done
    if ((rc == 0)); then
        sinfo -N -o '%N %T %C' || rc=1
        squeue || rc=1
    fi
    return $rc
}

case "$ACTION" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    restart) stop; start ;;
    *) die "usage: $0 start|stop|status|restart" ;;
esac
