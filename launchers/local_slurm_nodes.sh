#!/usr/bin/env bash
# A real multi-node Slurm on ONE Linux box (default 2 nodes), so tests exercise multi-node jobs, node loss
# and preemption through the same sbatch/srun path as a GPU cluster. Called by local_slurm.sh:
#
#   bash launchers/local_slurm.sh start --nodes 2    # or GPTOSS_SLURM_NODES=2; idempotent
#   bash launchers/local_slurm.sh status --nodes 2   # exit 0 only if munged, slurmctld, slurmdbd, every node answer
#   bash launchers/local_slurm.sh stop --nodes 2     # cancels jobs, kills what is left in the node namespaces,
#                                                    # stops the daemons, removes namespaces, veths and bridge
#   bash launchers/local_slurm.sh restart-ctld [DOWN_S] --nodes 2  # slurmctld down DOWN_S s, then back from its state
#   eval "$(bash launchers/local_slurm.sh start --nodes 2)"   # LAST stdout line: export SLURM_CONF=...
#
# Every node is a slurmd (`slurmd -N nodeK`; Debian's slurm-wlm is built with MULTIPLE_SLURMD) in its own
#   - network namespace <prefix>-nodeK, one veth into the bridge <prefix>-br0: node IP $NET.(10+K), the
#     host side $NET.1, no default route (nothing leaves the box);
#   - UTS namespace: hostname nodeK, so gethostname(), gloo and MASTER_ADDR see distinct hosts;
#   - mount namespace: $DIR/etc/hosts and resolv.conf bind-mounted over /etc's (nothing in /etc changes).
# slurmctld, slurmdbd, MariaDB and a private munged (own key and socket) run on the host. Job steps run
# inside the node namespaces; the filesystem is shared, like NFS on a real cluster. Clients work from the
# host. Only jobs and slurmctld resolve nodeK.
# It never touches the one-node instance (own dir, ports, munged, bridge), so both can run at once.
#
# Knobs (environment): GPTOSS_SLURM_NODES (2), GPTOSS_SLURM_MULTI_DIR (/var/tmp/gptoss_hpc_slurm_nodes),
# GPTOSS_SLURM_MULTI_PORT slurmctld (7817; slurmd +1 inside the namespaces, slurmdbd +2),
# GPTOSS_SLURM_MULTI_DB_PORT MariaDB (7317), GPTOSS_SLURM_MULTI_NET first three octets of a /24
# (10.200.0), GPTOSS_SLURM_MULTI_PREFIX namespace/link name prefix (gsn), GPTOSS_SLURM_CPUS per node (8).
# Each node advertises 8 fake GPUs, like the one-node cluster, so conf/cluster/local_slurm.yaml fits.
# SlurmdTimeout is 20 s (real sites: 300) so that a lost node fails its jobs within a minute.
# Pitfalls met while building it: /work/shared/TWO_NODE_SLURM.md (nsenter, not `ip netns exec`; resolver
# 127.0.0.1; SlurmctldHost = `hostname -s` at the bridge IP; AccountingStoragePass = munge socket).
# All chatter goes to stderr; `start` prints only the export line to stdout.
set -euo pipefail

NODES="${GPTOSS_SLURM_NODES:-2}"
DIR="${GPTOSS_SLURM_MULTI_DIR:-/var/tmp/gptoss_hpc_slurm_nodes}"
CPUS="${GPTOSS_SLURM_CPUS:-8}"
GPUS=8
MEM_MB="${GPTOSS_SLURM_MEMORY_MB:-1000000}"
CTLD_PORT="${GPTOSS_SLURM_MULTI_PORT:-7817}"
SLURMD_PORT=$((CTLD_PORT + 1))
DBD_PORT=$((CTLD_PORT + 2))
DB_PORT="${GPTOSS_SLURM_MULTI_DB_PORT:-7317}"
NET="${GPTOSS_SLURM_MULTI_NET:-10.200.0}"
PFX="${GPTOSS_SLURM_MULTI_PREFIX:-gsn}"
SLURMD_TIMEOUT=20

CLUSTER=gptoss_nodes
PARTITION=debug
HOST_IP="$NET.1"
BRIDGE="$PFX-br0"
CTL_NAME="$(hostname -s)" # slurmctld insists that SlurmctldHost's name is its own hostname
MUNGE_SOCK_DIR="$DIR/munge-run" # must be 0755 and root-owned
MUNGE_SOCK="$MUNGE_SOCK_DIR/munge.socket.2"
DB_SOCKET="$DIR/mysql/mysqld.sock"
DB_PASS=gptoss_nodes_local_only # loopback-only throwaway test database, not a secret
export SLURM_CONF="$DIR/etc/slurm.conf"
PARAMS="nodes=$NODES cpus=$CPUS gpus=$GPUS mem=$MEM_MB port=$CTLD_PORT dbport=$DB_PORT net=$NET prefix=$PFX"

log() { printf '[local_slurm %s nodes] %s\n' "$NODES" "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

[[ $NODES =~ ^[0-9]+$ ]] && ((NODES >= 2 && NODES <= 8)) || die "--nodes must be 2..8 (got '$NODES')"
[[ $NET =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "GPTOSS_SLURM_MULTI_NET must be three octets like 10.200.0 (got '$NET')"

node_name() { echo "node$1"; }
node_ip() { echo "$NET.$((10 + $1))"; }
node_ns() { echo "$PFX-node$1"; }
node_veth() { echo "$PFX-v$1"; }

# --------------------------------------------------------------------------- processes
read_pid() { { tr -dc '0-9' <"$1"; } 2>/dev/null || true; }

# pid_alive PID NAME: PID is a live (not zombie: PID 1 here reaps late) process whose comm is NAME
pid_alive() {
    local pid=$1 name=$2 st
    [[ -n $pid && -r /proc/$pid/stat ]] || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$name" ]] || return 1
    st=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
    [[ $st != Z && $st != X ]]
}
# ours PID: started by this script for this DIR (PIDs wrap quickly here, and the one-node cluster runs
# daemons of the same names, which a stale pid file of ours could now name)
ours() {
    tr '\0' '\n' <"/proc/$1/environ" 2>/dev/null | grep -qxF "SLURM_CONF=$SLURM_CONF" ||
        tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -qF "$DIR/"
}
alive() {
    local pid
    pid=$(read_pid "$1")
    pid_alive "$pid" "$2" && ours "$pid"
}

wait_for() { # wait_for SECONDS CMD...: retry CMD every 0.25 s
    local s=$1 i
    shift
    for ((i = 0; i < s * 4; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.25
    done
    return 1
}

# kill_pids WHAT PID...: TERM, wait up to 10 s, then KILL (only the PIDs given)
kill_pids() {
    local what=$1 i p left=()
    shift
    (($# > 0)) || return 0
    log "stopping $what (pid $*)"
    kill -TERM "$@" 2>/dev/null || true
    for ((i = 0; i < 40; i++)); do
        left=()
        for p in "$@"; do
            [[ -d /proc/$p && "$(awk '{print $3}' /proc/"$p"/stat 2>/dev/null)" != Z ]] && left+=("$p")
        done
        ((${#left[@]} == 0)) && return 0
        sleep 0.25
    done
    log "$what did not stop in 10 s: SIGKILL ${left[*]}"
    kill -KILL "${left[@]}" 2>/dev/null || true
    sleep 0.5
}

stop_pidfile() { # stop_pidfile PIDFILE NAME
    local pid
    pid=$(read_pid "$1")
    if pid_alive "$pid" "$2" && ours "$pid"; then kill_pids "$2" "$pid"; fi
    rm -f "$1"
}

# --------------------------------------------------------------------------- install
ensure_packages() {
    local pkgs=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server mariadb-client iproute2 util-linux)
    local missing=() p
    for p in "${pkgs[@]}"; do
        [[ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)" == installed ]] || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return 0
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-cache show "${missing[@]}" >/dev/null 2>&1 || apt-get update -q >&2
    apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 || die "apt-get install ${missing[*]} failed"
}

# --------------------------------------------------------------------------- network
netns_exists() { [[ -e /run/netns/$1 ]]; }

# every namespace/link with our prefix (also those of an earlier run with more nodes)
our_netns() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$PFX-node[0-9]+\$" || true; }
our_veths() { ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' | grep -E "^$PFX-v[0-9]+\$" || true; }

# ns_pids NS: processes in network namespace NS (job leftovers, slurmstepd, slurmd)
ns_pids() { ip netns pids "$1" 2>/dev/null | tr '\n' ' ' || true; }

net_down() {
    local ns pids v
    for ns in $(our_netns); do
        pids=$(ns_pids "$ns")
        # shellcheck disable=SC2086
        [[ -n ${pids// /} ]] && kill_pids "processes left in $ns" $pids
        ip netns del "$ns" 2>/dev/null || log "could not delete netns $ns"
    done
    for v in $(our_veths); do ip link del "$v" 2>/dev/null || true; done
    ip link del "$BRIDGE" 2>/dev/null || true
}

net_up() {
    local k ns veth ip
    # refuse to shadow a subnet someone else uses
    if ip -4 -o addr show | awk -v b="$BRIDGE" '$2 != b' | grep -q " inet $NET\."; then
        die "$NET.0/24 is already used on this machine: set GPTOSS_SLURM_MULTI_NET"
    fi
    ip link add "$BRIDGE" type bridge
    ip addr add "$HOST_IP/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    for ((k = 1; k <= NODES; k++)); do
        ns=$(node_ns "$k") veth=$(node_veth "$k") ip=$(node_ip "$k")
        ip netns add "$ns"
        ip link add "$veth" type veth peer name "${veth}p"
        ip link set "${veth}p" netns "$ns"
        ip -n "$ns" link set "${veth}p" name eth0
        ip -n "$ns" addr add "$ip/24" dev eth0
        ip -n "$ns" link set lo up
        ip -n "$ns" link set eth0 up
        ip link set "$veth" master "$BRIDGE" up
    done
}

# --------------------------------------------------------------------------- config
write_configs() {
    local k nodes_line="" hosts_node="" gres="" i
    mkdir -p "$DIR"/{etc,state,spool,log,run,dev,munge} "$MUNGE_SOCK_DIR"
    chmod 755 "$DIR" "$DIR"/{etc,state,spool,log,run,dev} "$MUNGE_SOCK_DIR"
    chmod 700 "$DIR/munge"
    for ((i = 0; i < GPUS; i++)); do # fake GPUs: slurm refuses regular files and drops lines without File=
        [[ -c $DIR/dev/nvidia$i ]] || {
            rm -f "$DIR/dev/nvidia$i"
            mknod "$DIR/dev/nvidia$i" c 1 3
        }
    done
    for ((k = 1; k <= NODES; k++)); do
        nodes_line+="NodeName=$(node_name "$k") NodeHostname=$(node_name "$k") NodeAddr=$(node_ip "$k")"
        nodes_line+=" CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:$GPUS State=UNKNOWN"$'\n'
        hosts_node+="$(node_ip "$k") $(node_name "$k")"$'\n'
        gres+="NodeName=$(node_name "$k") Name=gpu File=$DIR/dev/nvidia[0-$((GPUS - 1))]"$'\n'
    done
    cat >"$SLURM_CONF" <<EOF
# Written by launchers/local_slurm_nodes.sh: a $NODES-node test cluster on one box. Do not edit; edit the script.
ClusterName=$CLUSTER
SlurmctldHost=$CTL_NAME($HOST_IP)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCK,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
DependencyParameters=kill_invalid_depend
ReturnToService=2
SlurmdTimeout=$SLURMD_TIMEOUT
MailProg=/bin/true
MpiDefault=none
InactiveLimit=0
KillWait=5
MinJobAge=300
SlurmdParameters=config_overrides
GresTypes=gpu
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$HOST_IP
AccountingStoragePort=$DBD_PORT
# with a private munged, the socket for slurmdbd traffic is AccountingStoragePass, not AuthInfo
AccountingStoragePass=$MUNGE_SOCK
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
${nodes_line}PartitionName=$PARTITION Nodes=node[1-$NODES] Default=YES MaxTime=INFINITE State=UP
EOF
    printf '# Written by launchers/local_slurm_nodes.sh: fake GPUs (c 1 3, like /dev/null).\nAutoDetect=off\n%s' \
        "$gres" >"$DIR/etc/gres.conf"
    # the /etc/hosts every node namespace (and slurmctld) sees
    printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n%s %s\n%s' \
        "$HOST_IP" "$CTL_NAME" "$hosts_node" >"$DIR/etc/hosts"
    # unknown names fail at once instead of asking the VM's resolver
    printf 'nameserver 127.0.0.1\noptions timeout:1 attempts:1\n' >"$DIR/etc/resolv.conf"
    printf '%s\n' "$PARAMS" >"$DIR/etc/params"
    chmod 644 "$SLURM_CONF" "$DIR/etc/gres.conf" "$DIR/etc/hosts" "$DIR/etc/resolv.conf" "$DIR/etc/params"
    # slurmdbd wants mode 600, owned by SlurmUser
    (
        umask 077
        cat >"$DIR/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=$CTL_NAME
DbdAddr=$HOST_IP
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
    )
}

# --------------------------------------------------------------------------- daemons
munge_ok() { munge -n -S "$MUNGE_SOCK" </dev/null 2>/dev/null | unmunge -S "$MUNGE_SOCK" >/dev/null 2>&1; }

start_munge() {
    local key="$DIR/munge/munge.key"
    if [[ ! -s $key ]]; then
        dd if=/dev/urandom of="$key.tmp" bs=1024 count=1 status=none
        mv -f "$key.tmp" "$key"
    fi
    chown root:root "$key" "$MUNGE_SOCK_DIR"
    chmod 0400 "$key"
    chmod 755 "$MUNGE_SOCK_DIR"
    log "starting a private munged ($MUNGE_SOCK)"
    munged --socket="$MUNGE_SOCK" --key-file="$key" --pid-file="$DIR/run/munged.pid" \
        --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" \
        </dev/null >>"$DIR/log/munged.out" 2>&1 || die "munged failed; see $DIR/log/munged.log"
    wait_for 10 munge_ok || die "munged does not answer; see $DIR/log/munged.log"
}

db_ok() { mariadb-admin --no-defaults --socket="$DB_SOCKET" -uroot ping; }

start_accounting() {
    # a fresh database every start: slurmctld starts from empty state, so job ids restart at 1 and an old
    # database would make sacct show stale jobs under the same ids
    rm -rf "$DIR/mysql" && mkdir -p "$DIR/mysql"
    log "initialising MariaDB in $DIR/mysql/data"
    mariadb-install-db --no-defaults --datadir="$DIR/mysql/data" --user=root \
        --auth-root-authentication-method=socket --skip-test-db >"$DIR/log/mariadb-install.log" 2>&1 ||
        die "mariadb-install-db failed; see $DIR/log/mariadb-install.log"
    log "starting mariadbd on 127.0.0.1:$DB_PORT"
    setsid mariadbd --no-defaults --user=root --datadir="$DIR/mysql/data" --socket="$DB_SOCKET" \
        --port="$DB_PORT" --bind-address=127.0.0.1 --pid-file="$DIR/run/mariadbd.pid" \
        --log-error="$DIR/log/mariadb.log" --skip-name-resolve --skip-log-bin \
        --performance-schema=OFF --innodb-buffer-pool-size=64M --innodb-log-file-size=16M \
        --innodb-lock-wait-timeout=900 </dev/null >>"$DIR/log/mariadb.out" 2>&1 &
    wait_for 60 db_ok || die "MariaDB does not answer; see $DIR/log/mariadb.log"
    mariadb --no-defaults --socket="$DB_SOCKET" -uroot -e "
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;" >&2 ||
        die "could not create the slurm database user"
    log "starting slurmdbd on $HOST_IP:$DBD_PORT"
    SLURM_CONF="$SLURM_CONF" slurmdbd </dev/null >>"$DIR/log/slurmdbd.out" 2>&1 ||
        die "slurmdbd failed; see $DIR/log/slurmdbd.log"
    wait_for 30 sacctmgr -n -P list cluster format=cluster || die "slurmdbd does not answer; see $DIR/log/slurmdbd.log"
    if ! sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"; then
        sacctmgr -i add cluster "$CLUSTER" >&2 || die "sacctmgr add cluster $CLUSTER failed"
    fi
}

ctld_ok() { scontrol ping 2>/dev/null | grep -q 'is UP'; }

start_slurmctld() {
    rm -rf "$DIR/state" && mkdir -p "$DIR/state" # a fresh controller: no jobs from an earlier run
    run_slurmctld
}

# run_slurmctld: slurmctld from the saved state in $DIR/state (start_slurmctld empties it first; restart-ctld not)
run_slurmctld() {
    log "starting slurmctld on $HOST_IP:$CTLD_PORT"
    # own mount namespace with the nodes' /etc/hosts, so that slurmctld resolves nodeK
    unshare --mount --propagation private -- /bin/sh -c \
        'mount --bind "$1/hosts" /etc/hosts && mount --bind "$1/resolv.conf" /etc/resolv.conf && exec slurmctld -i' \
        sh "$DIR/etc" </dev/null >>"$DIR/log/slurmctld.out" 2>&1 || die "slurmctld failed; see $DIR/log/slurmctld.log"
    wait_for 30 ctld_ok || die "slurmctld does not answer; see $DIR/log/slurmctld.log"
}

# start_slurmd K: slurmd of node K in its namespaces (also how a test brings a killed node back)
start_slurmd() {
    local node ns
    node=$(node_name "$1") ns=$(node_ns "$1")
    netns_exists "$ns" || die "no network namespace $ns: run start"
    rm -rf "$DIR/spool/$node" && mkdir -p "$DIR/spool/$node"
    log "starting slurmd $node in netns $ns ($(node_ip "$1"))"
    # nsenter --net, not `ip netns exec`: the latter remounts /sys, hiding /sys/fs/cgroup, and slurmd then
    # dies with "No filesystem mounted on /sys/fs/cgroup"
    nsenter --net="/run/netns/$ns" unshare --uts --mount --propagation private -- /bin/sh -c \
        'mount --bind "$1/hosts" /etc/hosts && mount --bind "$1/resolv.conf" /etc/resolv.conf &&
         hostname "$2" && exec slurmd -N "$2"' \
        sh "$DIR/etc" "$node" </dev/null >>"$DIR/log/slurmd-$node.out" 2>&1 ||
        die "slurmd $node failed; see $DIR/log/slurmd-$node.log"
}

nodes_ready() {
    local n
    n=$(sinfo -h -N -o '%N %T' 2>/dev/null | grep -cE ' (idle|mixed|allocated|completing)$' || true)
    [[ $n == "$NODES" ]]
}

# --------------------------------------------------------------------------- commands
healthy() {
    local k
    [[ "$(cat "$DIR/etc/params" 2>/dev/null)" == "$PARAMS" ]] || return 1 # started with other knobs
    munge_ok || return 1
    alive "$DIR/run/slurmctld.pid" slurmctld || return 1
    alive "$DIR/run/slurmdbd.pid" slurmdbd || return 1
    for ((k = 1; k <= NODES; k++)); do
        netns_exists "$(node_ns "$k")" || return 1
        alive "$DIR/run/slurmd-$(node_name "$k").pid" slurmd || return 1
    done
    ctld_ok && nodes_ready && sacct -n -X -j 1 >/dev/null 2>&1
}

cmd_start() {
    local t0=$SECONDS k
    [[ $(id -u) == 0 ]] || die "run as root (network namespaces, SlurmUser=root)"
    ensure_packages
    if [[ -f $SLURM_CONF ]] && healthy; then
        log "already up: $(sinfo -h -N -o '%N=%T' | tr '\n' ' ')"
        printf 'export SLURM_CONF=%q\n' "$SLURM_CONF"
        return 0
    fi
    cmd_stop # clear whatever a half-started or crashed run left (only our pid files and names)
    write_configs
    net_up
    start_munge
    start_accounting
    start_slurmctld
    for ((k = 1; k <= NODES; k++)); do start_slurmd "$k"; done
    wait_for 60 nodes_ready || die "nodes not ready after 60 s: $(sinfo -h -N -o '%N=%T' | tr '\n' ' '); see $DIR/log"
    log "up in $((SECONDS - t0)) s: $(sinfo -h -N -o '%N=%T(cpus=%c,%G)' | tr '\n' ' ')"
    printf 'export SLURM_CONF=%q\n' "$SLURM_CONF"
}

no_active_jobs() { [[ -z "$(squeue -h -t PD,CF,R,CG,S -o %A 2>/dev/null)" ]]; }

cmd_stop() {
    local f jobs
    if [[ -f $SLURM_CONF ]] && alive "$DIR/run/slurmctld.pid" slurmctld; then
        jobs=$(squeue -h -o '%A' 2>/dev/null | sort -u | tr '\n' ' ' || true)
        if [[ -n ${jobs// /} ]]; then
            log "cancelling jobs: $jobs"
            # shellcheck disable=SC2086
            scancel $jobs >&2 || true
            wait_for 15 no_active_jobs || log "jobs still listed after 15 s; killing their processes"
        fi
    fi
    for f in "$DIR"/run/slurmd-*.pid; do [[ -e $f ]] && stop_pidfile "$f" slurmd; done
    net_down # kills whatever is left inside the node namespaces, then removes them
    stop_pidfile "$DIR/run/slurmctld.pid" slurmctld
    stop_pidfile "$DIR/run/slurmdbd.pid" slurmdbd
    stop_pidfile "$DIR/run/mariadbd.pid" mariadbd
    stop_pidfile "$DIR/run/munged.pid" munged
    log "stopped (logs kept in $DIR/log)"
}

# kill_node K: a node dies: its slurmd and every process in its namespace get SIGKILL (for node-loss tests)
cmd_kill_node() {
    local k=${1:-} ns pids
    [[ $k =~ ^[0-9]+$ ]] && ((k >= 1 && k <= NODES)) || die "kill-node needs a node number 1..$NODES"
    ns=$(node_ns "$k")
    pids=$(ns_pids "$ns")
    log "killing $(node_name "$k"): SIGKILL to every process in $ns ($pids)"
    # shellcheck disable=SC2086
    [[ -n ${pids// /} ]] && kill -KILL $pids 2>/dev/null
    rm -f "$DIR/run/slurmd-$(node_name "$k").pid"
    return 0
}

# restart_ctld [DOWN_S]: stop slurmctld (SIGTERM: it saves its state), leave it down DOWN_S seconds (default 0),
# start it again from that state, as an admin's `systemctl restart slurmctld` does; jobs keep running on the
# nodes and their slurmds report back to it
cmd_restart_ctld() {
    local down=${1:-0}
    [[ $down =~ ^[0-9]+$ ]] || die "restart-ctld takes the seconds to stay down (got '$down')"
    [[ -f $SLURM_CONF ]] && alive "$DIR/run/slurmctld.pid" slurmctld || die "slurmctld is not running: run start"
    stop_pidfile "$DIR/run/slurmctld.pid" slurmctld
    sleep "$down"
    run_slurmctld
    wait_for 60 nodes_ready || die "nodes not ready after the restart: $(sinfo -h -N -o '%N=%T' | tr '\n' ' ')"
    log "slurmctld restarted: $(sinfo -h -N -o '%N=%T' | tr '\n' ' ')"
}

# revive_node K: restart node K's slurmd after kill-node and wait until it is usable again
cmd_revive_node() {
    local k=${1:-} node
    [[ $k =~ ^[0-9]+$ ]] && ((k >= 1 && k <= NODES)) || die "revive-node needs a node number 1..$NODES"
    node=$(node_name "$k")
    alive "$DIR/run/slurmd-$node.pid" slurmd || start_slurmd "$k"
    # a node that was DOWN returns by itself (ReturnToService=2); a drained one needs RESUME
    if ! wait_for 30 nodes_ready; then
        scontrol update NodeName="$node" State=RESUME >&2 || true
        wait_for 30 nodes_ready || die "$node not ready: $(sinfo -h -N -o '%N=%T' | tr '\n' ' ')"
    fi
    log "$node is back: $(sinfo -h -N -o '%N=%T' | tr '\n' ' ')"
}

cmd_status() {
    local rc=0 k d
    if alive "$DIR/run/munged.pid" munged && munge_ok; then log "munged: running"; else
        log "munged: not running"
        rc=1
    fi
    for d in slurmctld slurmdbd mariadbd; do
        if alive "$DIR/run/$d.pid" "$d"; then log "$d: running (pid $(read_pid "$DIR/run/$d.pid"))"; else
            log "$d: not running"
            rc=1
        fi
    done
    for ((k = 1; k <= NODES; k++)); do
        if netns_exists "$(node_ns "$k")" && alive "$DIR/run/slurmd-$(node_name "$k").pid" slurmd; then
            log "$(node_name "$k"): slurmd running in netns $(node_ns "$k") ($(node_ip "$k"))"
        else
            log "$(node_name "$k"): netns or slurmd missing"
            rc=1
        fi
    done
    if ((rc == 0)); then
        ctld_ok || {
            log "scontrol ping: slurmctld does not answer"
            rc=1
        }
        nodes_ready || {
            log "nodes not all usable"
            rc=1
        }
        sacct -n -X -j 1 >/dev/null 2>&1 || {
            log "sacct fails (slurmdbd/MariaDB)"
            rc=1
        }
        log "nodes: $(sinfo -h -N -o '%N=%T' 2>/dev/null | tr '\n' ' ')"
    fi
    if ((rc == 0)); then log "up; SLURM_CONF=$SLURM_CONF"; else log "not (fully) up"; fi
    return "$rc"
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    kill-node) cmd_kill_node "${2:-}" ;;
    revive-node) cmd_revive_node "${2:-}" ;;
    restart-ctld) cmd_restart_ctld "${2:-0}" ;;
    *)
        echo "usage: $0 {start|stop|status|kill-node K|revive-node K|restart-ctld [DOWN_S]}   (env GPTOSS_SLURM_NODES=$NODES)" >&2
        exit 2
        ;;
esac
