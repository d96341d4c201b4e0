#!/usr/bin/env bash
# A two-node Slurm cluster on this machine (tests, trying r1mega-submit without a cluster).
#
#   slurm/local-cluster.sh install   # Debian's slurmctld, slurmd, slurm-client and munge (root)
#   slurm/local-cluster.sh start     # fresh munge key, config and state under $R1MEGA_SLURM_DIR
#   slurm/local-cluster.sh stop      # stop the daemons and remove that folder
#   slurm/local-cluster.sh env       # the line to eval so sbatch/sinfo find this cluster
#
# Everything lives under R1MEGA_SLURM_DIR (default /tmp/r1mega-slurm): slurm.conf, munge key
# and socket, controller state, logs. Two slurmd daemons play two nodes, named by this host's
# short name and `localhost` (names that resolve, so a multi-node job's rendezvous works). Each
# node offers this machine's CPUs and half its memory; no GPUs. Partitions: `debug` (default)
# and `short`, with a 10-minute limit. Run as root.
set -euo pipefail
DIR=${R1MEGA_SLURM_DIR:-/tmp/r1mega-slurm}
CONF=$DIR/slurm.conf
MARK=.r1mega-local-cluster  # only a folder holding this file is ever removed
HOST=$(hostname -s)
NODES="$HOST localhost"

install() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null && command -v sbatch >/dev/null && return
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
    local cpus mem
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
    cat >"$CONF" <<EOF
ClusterName=r1mega-local
SlurmctldHost=$HOST
SlurmctldPort=${R1MEGA_SLURMCTLD_PORT:-16817}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
SchedulerParameters=bf_interval=5,sched_interval=3
NodeName=$HOST NodeAddr=127.0.0.1 Port=${R1MEGA_SLURMD_PORT:-16818} CPUs=$cpus RealMemory=$((mem / 2)) State=UNKNOWN
NodeName=localhost NodeAddr=127.0.0.1 Port=$(( ${R1MEGA_SLURMD_PORT:-16818} + 1 )) CPUs=$cpus RealMemory=$((mem / 2)) State=UNKNOWN
PartitionName=debug Nodes=$HOST,localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:2
PartitionName=short Nodes=$HOST,localhost MaxTime=00:10:00 State=UP OverSubscribe=FORCE:2
EOF
}

start() {
    [ "$(id -u)" = 0 ] || { echo "local-cluster.sh: run as root" >&2; exit 1; }
    install
    stop quiet
    mkdir -p "$DIR"/{state,spool,log,munge}
    touch "$DIR/$MARK"
    write_conf
    # A fresh key per cluster: nothing outside this folder can talk to it.
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chown -R munge:munge "$DIR/munge"
    chmod 700 "$DIR/munge"
    chmod 400 "$DIR/munge/munge.key"
    # munged refuses sockets in world-writable folders such as /tmp unless forced.
    runuser -u munge -- munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/seed"
    chmod 755 "$DIR/munge"
    slurmctld -f "$CONF"
    for node in $NODES; do
        mkdir -p "$DIR/spool/$node"
        slurmd -f "$CONF" -N "$node"
    done
    for _ in $(seq 60); do
        if [ "$(SLURM_CONF=$CONF sinfo -h -N -p debug -t idle,mixed,allocated -o %N 2>/dev/null | wc -l)" = 2 ]; then
            echo "local Slurm cluster up: export SLURM_CONF=$CONF"
            return
        fi
        sleep 1
    done
    echo "local-cluster.sh: the node did not come up; logs in $DIR/log" >&2
    tail -n 20 "$DIR"/log/*.log >&2 || true
    exit 1
}

stop() {
    [ -e "$DIR" ] || { [ "${1:-}" = quiet ] || echo "local Slurm cluster: nothing at $DIR"; return; }
    if [ ! -f "$DIR/$MARK" ]; then
        echo "local-cluster.sh: $DIR exists but was not made by this script; not touching it" >&2
        exit 1
    fi
    for pidfile in "$DIR"/slurmd-*.pid "$DIR/slurmctld.pid" "$DIR/munge/munged.pid"; do
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        # a stale pid file may name someone else's process by now
        grep -qxE 'slurmd|slurmctld|munged' "/proc/$pid/comm" 2>/dev/null || continue
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
    rm -rf "$DIR"
    [ "${1:-}" = quiet ] || echo "local Slurm cluster stopped"
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 install|start|stop|env" >&2; exit 2 ;;
esac
