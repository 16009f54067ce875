#!/usr/bin/env bash
# A real one-node Slurm on this machine, for tests and demos: slurmctld + slurmd + munge, plus
# MariaDB + slurmdbd so that sacct (and submitit's job states) work.
#
#   bash launchers/local_slurm.sh start    # idempotent; LAST stdout line: export SLURM_CONF=<dir>/slurm.conf
#   bash launchers/local_slurm.sh status   # exit 0 only if slurmctld, slurmd and slurmdbd answer
#   bash launchers/local_slurm.sh stop     # cancels every job, then stops all daemons
#
#   eval "$(bash launchers/local_slurm.sh start)"   # then sbatch/squeue/sacct/submitit work
#
# Runs as root (installs Debian's slurmctld slurmd slurm-client munge slurmdbd mariadb-server when
# missing). Everything it writes lives under ${GPTOSS_SLURM_DIR:-/var/tmp/gptoss_hpc_slurm}; the only
# shared path is munge's default socket /run/munge/munge.socket.2 (slurmdbd/sacctmgr ignore others).
# The node advertises CPUS cores, REAL_MEMORY_MB and 8 fake GPUs (character devices made with
# `mknod c 1 3`) in partition `debug`, so gpu jobs get CUDA_VISIBLE_DEVICES like on a real node.
# Ports: slurmctld ${GPTOSS_SLURM_PORT:-6817}, slurmd +1, slurmdbd +2, MariaDB ${GPTOSS_SLURM_DB_PORT:-3317}.
# A second, private instance (e.g. to test this script) needs its own GPTOSS_SLURM_DIR, GPTOSS_SLURM_PORT
# and GPTOSS_SLURM_DB_PORT; it shares munged.
# All chatter goes to stderr; only `start` prints to stdout (the export line).
#
#   bash launchers/local_slurm.sh start --nodes 2   # (or GPTOSS_SLURM_NODES=2) a 2-node cluster instead:
# see launchers/local_slurm_nodes.sh (own dir, ports 7817-7819, MariaDB 7317, bridge 10.200.0.0/24).
set -euo pipefail

# --nodes N / GPTOSS_SLURM_NODES=N with N > 1: the multi-node cluster, a separate instance and script.
_nodes="${GPTOSS_SLURM_NODES:-1}"
_args=()
while (($#)); do
    case "$1" in
        --nodes) _nodes="${2:-}"; shift 2 || { echo "--nodes needs a number" >&2; exit 2; } ;;
        --nodes=*) _nodes="${1#--nodes=}"; shift ;;
        *) _args+=("$1"); shift ;;
    esac
done
if [[ $_nodes != 1 ]]; then
    GPTOSS_SLURM_NODES="$_nodes" exec bash "$(dirname "${BASH_SOURCE[0]}")/local_slurm_nodes.sh" "${_args[@]}"
fi
set -- "${_args[@]}"

DIR="${GPTOSS_SLURM_DIR:-/var/tmp/gptoss_hpc_slurm}"
DB_PORT="${GPTOSS_SLURM_DB_PORT:-3317}"
CTLD_PORT="${GPTOSS_SLURM_PORT:-6817}"
SLURMD_PORT=$((CTLD_PORT + 1))
DBD_PORT=$((CTLD_PORT + 2))
CPUS="${GPTOSS_SLURM_CPUS:-8}"
GPUS=8
REAL_MEMORY_MB="${GPTOSS_SLURM_MEMORY_MB:-1000000}"
CLUSTER=gptoss_local
PARTITION=debug
NODE="$(hostname -s)"
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
MUNGE_SOCKET_DIR=/run/munge
DB_SOCKET="$DIR/mysql/mysqld.sock"
DB_PASS=gptoss_local_only   # local loopback-only test database, not a secret

export SLURM_CONF="$DIR/slurm.conf"

log() { printf '[local_slurm] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

usage() {
    echo "usage: $0 {start|stop|status}" >&2
    exit 2
}

# --------------------------------------------------------------------------- processes
# read_pid PIDFILE: the pid in PIDFILE, or nothing (daemons remove their pid file as they exit).
read_pid() { { tr -dc '0-9' <"$1"; } 2>/dev/null || true; }

# pid_alive PID NAME: PID runs a process called NAME that is not a zombie (PID 1 here reaps late).
pid_alive() {
    local pid=$1 name=$2 stat comm
    [[ -n $pid && -r /proc/$pid/stat ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $comm == "$name" ]] || return 1
    # field 3 of /proc/PID/stat is the state; comm (field 2) has no spaces for our daemons
    stat=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
    [[ $stat != Z && $stat != X ]]
}

# alive PIDFILE NAME
alive() { pid_alive "$(read_pid "$1")" "$2"; }

# wait_for SECONDS CMD...: retry CMD every 0.25 s until it succeeds.
wait_for() {
    local seconds=$1 i
    shift
    for ((i = 0; i < seconds * 4; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.25
    done
    return 1
}

# stop_pid PIDFILE NAME: SIGTERM, wait up to 20 s, then SIGKILL.
stop_pid() {
    local pidfile=$1 name=$2 pid i
    pid=$(read_pid "$pidfile")
    if ! pid_alive "$pid" "$name"; then
        rm -f "$pidfile"
        return 0
    fi
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 80; i++)); do
        pid_alive "$pid" "$name" || break
        sleep 0.25
    done
    if pid_alive "$pid" "$name"; then
        log "$name did not stop in 20 s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    rm -f "$pidfile"
}

# --------------------------------------------------------------------------- install
ensure_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        if [[ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)" != installed ]]; then
            missing+=("$p")
        fi
    done
    ((${#missing[@]} == 0)) && return 0
    [[ $(id -u) == 0 ]] || die "Debian packages missing (${missing[*]}); run this script as root"
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # apt-get update only when the package lists don't know a package yet
    if ! apt-cache show "${missing[@]}" >/dev/null 2>&1; then
        log "apt-get update"
        apt-get update -q >&2
    fi
    apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 ||
        die "apt-get install ${missing[*]} failed"
}

# --------------------------------------------------------------------------- config
# install_file TARGET MODE: write stdin to TARGET if its content changed; returns 0 if changed.
install_file() {
    local target=$1 mode=$2 tmp
    tmp=$(mktemp "$target.XXXXXX")
    cat >"$tmp"
    chmod "$mode" "$tmp"
    if [[ -f $target ]] && cmp -s "$tmp" "$target"; then
        rm -f "$tmp"
        chmod "$mode" "$target"
        return 1
    fi
    mv -f "$tmp" "$target"
    return 0
}

SLURM_CONF_CHANGED=0
DBD_CONF_CHANGED=0

write_configs() {
    mkdir -p "$DIR"/{state,spool,log,run,dev,munge,mysql}
    chmod 755 "$DIR" "$DIR"/{state,spool,log,run,dev}
    chmod 700 "$DIR/munge"
    local i
    for ((i = 0; i < GPUS; i++)); do
        # fake GPUs: slurm refuses regular files and drops GPU lines without File=
        if [[ ! -c $DIR/dev/nvidia$i ]]; then
            rm -f "$DIR/dev/nvidia$i"
            mknod "$DIR/dev/nvidia$i" c 1 3
        fi
    done

    local port_lines=""   # default ports stay implicit
    if ((CTLD_PORT != 6817)); then
        port_lines=$'\n'"SlurmctldPort=$CTLD_PORT"$'\n'"SlurmdPort=$SLURMD_PORT"
    fi
    if install_file "$DIR/slurm.conf" 644 <<EOF; then SLURM_CONF_CHANGED=1; fi
# Written by launchers/local_slurm.sh: a one-node test cluster. Do not edit; edit the script.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)${port_lines}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5
DependencyParameters=kill_invalid_depend
ReturnToService=2
MailProg=/bin/true
MpiDefault=none
InactiveLimit=0
KillWait=5
MinJobAge=300
SlurmdParameters=config_overrides
GresTypes=gpu
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$REAL_MEMORY_MB Gres=gpu:$GPUS State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF

    if install_file "$DIR/gres.conf" 644 <<EOF; then SLURM_CONF_CHANGED=1; fi
# Written by launchers/local_slurm.sh: fake GPUs (character devices c 1 3, like /dev/null).
AutoDetect=off
NodeName=$NODE Name=gpu File=$DIR/dev/nvidia[0-$((GPUS - 1))]
EOF

    # slurmdbd refuses a slurmdbd.conf that is not owned by SlurmUser with mode 600
    if install_file "$DIR/slurmdbd.conf" 600 <<EOF; then DBD_CONF_CHANGED=1; fi
# Written by launchers/local_slurm.sh.
AuthType=auth/munge
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
DebugLevel=info
LogFile=$DIR/log/slurmdbd.log
PidFile=$DIR/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
}

# --------------------------------------------------------------------------- daemons
munge_ok() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_ok; then return 0; fi
    local key="$DIR/munge/munge.key"
    if [[ ! -s $key ]]; then
        log "creating munge key $key"
        dd if=/dev/urandom of="$key.tmp" bs=1024 count=1 status=none
        mv -f "$key.tmp" "$key"
    fi
    chown root:root "$key"
    chmod 0400 "$key"
    # default socket path (slurmdbd/sacctmgr ignore a custom one); its dir must be 755
    mkdir -p "$MUNGE_SOCKET_DIR"
    chown root:root "$MUNGE_SOCKET_DIR"
    chmod 755 "$MUNGE_SOCKET_DIR"
    stop_pid "$DIR/run/munged.pid" munged
    log "starting munged"
    munged --key-file="$key" --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munged.seed" </dev/null >>"$DIR/log/munged.out" 2>&1 ||
        die "munged failed to start; see $DIR/log/munged.log"
    wait_for 10 munge_ok || die "munge does not answer; see $DIR/log/munged.log"
}

db_ok() { mariadb-admin --no-defaults --socket="$DB_SOCKET" -uroot ping; }

start_mariadb() {
    if alive "$DIR/run/mariadbd.pid" mariadbd && db_ok >/dev/null 2>&1; then return 0; fi
    stop_pid "$DIR/run/mariadbd.pid" mariadbd
    local fresh=0
    if [[ ! -d $DIR/mysql/data/mysql ]]; then
        log "initialising MariaDB datadir $DIR/mysql/data"
        rm -rf "$DIR/mysql/data"
        mariadb-install-db --no-defaults --datadir="$DIR/mysql/data" --user=root \
            --auth-root-authentication-method=socket --skip-test-db >>"$DIR/log/mariadb-install.log" 2>&1 ||
            die "mariadb-install-db failed; see $DIR/log/mariadb-install.log"
        fresh=1
    fi
    log "starting mariadbd on 127.0.0.1:$DB_PORT"
    setsid mariadbd --no-defaults --user=root --datadir="$DIR/mysql/data" --socket="$DB_SOCKET" \
        --port="$DB_PORT" --bind-address=127.0.0.1 --pid-file="$DIR/run/mariadbd.pid" \
        --log-error="$DIR/log/mariadb.log" --skip-name-resolve --skip-log-bin \
        --performance-schema=OFF --innodb-buffer-pool-size=64M --innodb-log-file-size=16M \
        --innodb-lock-wait-timeout=900 --max-allowed-packet=64M \
        </dev/null >>"$DIR/log/mariadb.out" 2>&1 &
    wait_for 60 db_ok || die "MariaDB does not answer on $DB_SOCKET; see $DIR/log/mariadb.log"
    if ((fresh)); then
        mariadb --no-defaults --socket="$DB_SOCKET" -uroot -e "
            CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
            CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
            FLUSH PRIVILEGES;" >&2 || die "could not create the slurm database user"
    fi
}

dbd_ok() { sacctmgr -n -P list cluster format=cluster; }

start_slurmdbd() {
    if alive "$DIR/run/slurmdbd.pid" slurmdbd; then
        ((DBD_CONF_CHANGED)) || return 0
        log "slurmdbd.conf changed: restarting slurmdbd"
        stop_pid "$DIR/run/slurmdbd.pid" slurmdbd
    fi
    log "starting slurmdbd"
    slurmdbd </dev/null >>"$DIR/log/slurmdbd.out" 2>&1 || die "slurmdbd failed; see $DIR/log/slurmdbd.log"
    wait_for 30 dbd_ok || die "slurmdbd does not answer; see $DIR/log/slurmdbd.log"
    if ! sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"; then
        log "registering cluster $CLUSTER with slurmdbd"
        sacctmgr -i add cluster "$CLUSTER" >&2 || die "sacctmgr add cluster $CLUSTER failed"
    fi
}

start_slurmctld() {
    if alive "$DIR/run/slurmctld.pid" slurmctld; then
        ((SLURM_CONF_CHANGED)) || return 0
        log "slurm.conf changed: restarting slurmctld"
        stop_pid "$DIR/run/slurmctld.pid" slurmctld
    fi
    log "starting slurmctld"
    slurmctld </dev/null >>"$DIR/log/slurmctld.out" 2>&1 || die "slurmctld failed; see $DIR/log/slurmctld.log"
    wait_for 30 ctld_ok || die "slurmctld does not answer; see $DIR/log/slurmctld.log"
}

ctld_ok() { scontrol ping | grep -q 'is UP'; }

start_slurmd() {
    if alive "$DIR/run/slurmd.pid" slurmd; then
        ((SLURM_CONF_CHANGED)) || return 0
        log "slurm.conf changed: restarting slurmd"
        stop_pid "$DIR/run/slurmd.pid" slurmd
    fi
    log "starting slurmd"
    slurmd </dev/null >>"$DIR/log/slurmd.out" 2>&1 || die "slurmd failed; see $DIR/log/slurmd.log"
}

node_state() { sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n1; }

# wait until the node is usable; RESUME it if it came up drained/down (a drain survives restarts)
wait_node_ready() {
    local i state
    for ((i = 0; i < 120; i++)); do
        state=$(node_state)
        case "$state" in
            idle | mixed | allocated | completing)
                return 0
                ;;
            drain* | down* | inval* | fail*)
                log "node $NODE is $state: RESUME"
                scontrol update NodeName="$NODE" State=RESUME >&2 || true
                ;;
        esac
        sleep 0.25
    done
    die "node $NODE is '${state:-unknown}' after 30 s; see $DIR/log/slurmd.log and $DIR/log/slurmctld.log"
}

# --------------------------------------------------------------------------- commands
all_ok() {
    alive "$DIR/run/slurmctld.pid" slurmctld && alive "$DIR/run/slurmd.pid" slurmd &&
        alive "$DIR/run/slurmdbd.pid" slurmdbd && ctld_ok >/dev/null 2>&1 &&
        sinfo -h >/dev/null 2>&1 && sacct -n -X -j 1 >/dev/null 2>&1
}

cmd_start() {
    [[ $(id -u) == 0 ]] || die "run as root (SlurmUser=root)"
    ensure_packages
    write_configs
    start_munge
    start_mariadb
    start_slurmdbd
    start_slurmctld
    start_slurmd
    wait_node_ready
    wait_for 30 all_ok || die "cluster did not come up; see logs in $DIR/log"
    log "up: partition $PARTITION, node $NODE, CPUs=$CPUS, gpu:$GPUS, sacct via slurmdbd"
    printf 'export SLURM_CONF=%q\n' "$SLURM_CONF"
}

no_jobs() { [[ -z "$(squeue -h -o '%A')" ]]; }

cmd_stop() {
    if [[ -f $SLURM_CONF ]] && alive "$DIR/run/slurmctld.pid" slurmctld; then
        # job processes outlive slurmd under proctrack/linuxproc: cancel them first
        local jobs
        jobs=$(squeue -h -o '%A' 2>/dev/null | sort -u | tr '\n' ' ' || true)
        if [[ -n ${jobs// /} ]]; then
            log "cancelling jobs: $jobs"
            # shellcheck disable=SC2086
            scancel $jobs >&2 || true
            if alive "$DIR/run/slurmd.pid" slurmd; then
                wait_for 30 no_jobs ||
                    log "some jobs are still listed after 30 s: $(squeue -h -o '%A %T' | tr '\n' ' ')"
            fi
        fi
    fi
    stop_pid "$DIR/run/slurmd.pid" slurmd
    stop_pid "$DIR/run/slurmctld.pid" slurmctld
    stop_pid "$DIR/run/slurmdbd.pid" slurmdbd
    stop_pid "$DIR/run/mariadbd.pid" mariadbd
    stop_pid "$DIR/run/munged.pid" munged
    log "stopped"
}

cmd_status() {
    local rc=0 d
    for d in munged mariadbd slurmdbd slurmctld slurmd; do
        if alive "$DIR/run/$d.pid" "$d"; then
            log "$d: running (pid $(read_pid "$DIR/run/$d.pid"))"
        elif [[ $d == munged ]] && munge_ok; then
            log "munged: answering (not started by this script)"
        else
            log "$d: not running"
            [[ $d == munged || $d == mariadbd ]] || rc=1
        fi
    done
    if [[ ! -f $SLURM_CONF ]]; then
        log "no $SLURM_CONF: never started"
        return 1
    fi
    ctld_ok >/dev/null 2>&1 || { log "scontrol ping: slurmctld does not answer"; rc=1; }
    sinfo -h >/dev/null 2>&1 || { log "sinfo fails"; rc=1; }
    sacct -n -X -j 1 >/dev/null 2>&1 || { log "sacct fails (slurmdbd/MariaDB)"; rc=1; }
    if ((rc == 0)); then
        log "node: $(sinfo -h -N -o '%N %T cpus=%c gres=%G')"
        log "up; SLURM_CONF=$SLURM_CONF"
    fi
    return "$rc"
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) usage ;;
esac
