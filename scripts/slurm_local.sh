#!/usr/bin/env bash
# Start a real single-node SLURM cluster on this machine (for tests and CI).
#
#   sudo scripts/slurm_local.sh                  # install if needed, configure, start, wait until a job runs
#   sudo scripts/slurm_local.sh --restart        # stop our daemons, wipe the state, start fresh
#   sudo scripts/slurm_local.sh --no-accounting  # skip slurmdbd + MariaDB (sacct then fails)
#   sudo scripts/slurm_stop.sh                   # stop the SLURM daemons (--all: also MariaDB and munged)
#
# Idempotent: if the cluster already answers (sinfo shows the node usable) it says so and exits 0.
# Needs root (re-runs itself with sudo when that exists). Debian/Ubuntu only (apt-get).
#
# What it does, in order:
#   1. apt-get install slurm-wlm munge (+ slurmdbd mariadb-server for accounting), only when missing
#   2. a munge key (mungekey, or 1 KiB from /dev/urandom) owned by munge, mode 0400
#   3. slurm.conf (+ an inert cgroup.conf, + slurmdbd.conf) in the directory this Slurm build
#      reads: one node (this machine's CPUs and ~95% of its memory), partition `debug`
#      (default, MaxTime=INFINITE), job arrays up to MaxArraySize, no GRES.
#   4. munged; a private MariaDB (own datadir, 127.0.0.1 only) + slurmdbd so that `sacct`
#      works (submitit polls job states with sacct: without it a job killed before it
#      writes its result leaves `job.result()` waiting forever); slurmctld (fresh state
#      dir and a fresh accounting database, so job ids never collide); slurmd.
#   5. waits (SLURM_LOCAL_TIMEOUT s, default 90) for the node to be idle and for
#      `srun hostname` and a batch job to succeed; prints the daemon logs on failure.
#
# Environment overrides (all optional):
#   SLURM_LOCAL_TIMEOUT     seconds to wait for the cluster (default 90)
#   SLURM_LOCAL_ACCOUNTING  1 (default) or 0: same as --no-accounting
#   SLURM_LOCAL_NODENAME    node name (default: short hostname when it is a plain name, else "localnode")
#   SLURM_LOCAL_CPUS        CPUs to declare (default: nproc). More than the hardware has is allowed
#                           (SlurmdParameters=config_overrides) to run more 1-CPU jobs side by side.
#   SLURM_LOCAL_MEM_MB      RealMemory to declare (default: 95% of `free -m` total)
#   SLURM_LOCAL_STATE       state/spool base dir (default /var/lib/slurm-local)
#   SLURM_LOCAL_LOGS        log dir (default /var/log/slurm-local)
#   SLURM_LOCAL_DB_PORT     MariaDB port on 127.0.0.1 (default 3307; 3306 is left to a system MariaDB)
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        exec sudo -E bash "$0" "$@"
    fi
    echo "slurm_local.sh: must run as root (no sudo found)" >&2
    exit 1
fi

RESTART=0
ACCOUNTING=${SLURM_LOCAL_ACCOUNTING:-1}
for arg in "$@"; do
    case "$arg" in
        --restart) RESTART=1 ;;
        --no-accounting) ACCOUNTING=0 ;;
        --accounting) ACCOUNTING=1 ;;
        -h | --help) sed -n '2,33p' "$0"; exit 0 ;;
        *) echo "slurm_local.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-90}
STATE_BASE=${SLURM_LOCAL_STATE:-/var/lib/slurm-local}
LOG_DIR=${SLURM_LOCAL_LOGS:-/var/log/slurm-local}
DB_PORT=${SLURM_LOCAL_DB_PORT:-3307}
RUN_DIR=/run/slurm-local
CTLD_STATE=$STATE_BASE/slurmctld
SLURMD_SPOOL=$STATE_BASE/slurmd
DB_DATA=$STATE_BASE/mariadb
DB_RUN=$RUN_DIR/mariadb
DB_SOCK=$DB_RUN/mariadb.sock
DB_PID=$DB_RUN/mariadb.pid
DB_NAME=slurm_acct_db
CTLD_PID=$RUN_DIR/slurmctld.pid
SLURMD_PID=$RUN_DIR/slurmd.pid
DBD_PID=$RUN_DIR/slurmdbd.pid
CTLD_LOG=$LOG_DIR/slurmctld.log
SLURMD_LOG=$LOG_DIR/slurmd.log
DBD_LOG=$LOG_DIR/slurmdbd.log
DB_LOG=$LOG_DIR/mariadb.log
MUNGE_LOG=/var/log/munge/munged.log
CLUSTER=isdpo-local
PARTITION=debug
APT_LOG=/tmp/slurm_local_apt.log

say() { echo "[slurm_local] $*"; }
die() { echo "[slurm_local] ERROR: $*" >&2; exit 1; }

dump_logs() {
    local f
    for f in "$MUNGE_LOG" "$DB_LOG" "$DBD_LOG" "$CTLD_LOG" "$SLURMD_LOG"; do
        if [[ -f $f ]]; then
            echo "----- last lines of $f -----" >&2
            tail -n 40 "$f" >&2 || true
        fi
    done
    echo "----- sinfo -----" >&2
    timeout 5 sinfo -N -l >&2 2>&1 || true
}

fail() {
    echo "[slurm_local] ERROR: $*" >&2
    dump_logs
    exit 1
}

munge_ok() { command -v munge >/dev/null 2>&1 && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

node_state() { # prints the node's state (lower case) or nothing
    timeout 5 sinfo -h -N -o '%T' 2>/dev/null | head -n1 | tr '[:upper:]' '[:lower:]' || true
}

usable_state() {
    case "$1" in
        idle | mixed | allocated | completing | idle+* | mixed+* | allocated+*) return 0 ;;
        *) return 1 ;;
    esac
}

pid_alive() { # pidfile -> 0 when the process named in it runs
    [[ -f $1 ]] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null
}

DOWN_REASON=""
cluster_up() {
    DOWN_REASON=""
    munge_ok || { DOWN_REASON="munge does not answer"; return 1; }
    timeout 5 scontrol ping 2>/dev/null | grep -q 'UP' || { DOWN_REASON="slurmctld does not answer"; return 1; }
    # slurmctld notices a dead slurmd only after SlurmdTimeout: when this script started the
    # cluster (our pid files), look at the processes themselves
    if [[ -f $CTLD_PID ]]; then
        pid_alive "$SLURMD_PID" || { DOWN_REASON="slurmd is not running"; return 1; }
        if timeout 5 scontrol show config 2>/dev/null | grep -q 'AccountingStorageType.*slurmdbd'; then
            pid_alive "$DBD_PID" || { DOWN_REASON="slurmdbd is not running"; return 1; }
        fi
    fi
    usable_state "$(node_state)" || { DOWN_REASON="node state '$(node_state)'"; return 1; }
}

accounting_up() { timeout 10 sacct -n -X -j 1 -o JobID >/dev/null 2>&1; }

db_ok() { mariadb-admin --no-defaults --socket="$DB_SOCK" -u root ping >/dev/null 2>&1; }

db_sql() { mariadb --no-defaults --socket="$DB_SOCK" -u root -e "$1"; }

print_usage() {
    local node acct
    node=$(timeout 5 sinfo -h -N -o '%N' 2>/dev/null | head -n1 || true)
    if accounting_up; then
        acct="accounting: slurmdbd + MariaDB (sacct works)"
    else
        acct="accounting: none (sacct fails; submitit warns and still returns results, but a job killed
              before writing its result leaves job.result() waiting forever)"
    fi
    cat <<EOF
[slurm_local] SLURM cluster is up: node '${node}', partition '${PARTITION}' (default).
  ${acct}
  sinfo; squeue; sacct                   # look at it
  sbatch --wrap 'hostname'; srun hostname  # submit
  python -m pytest -m slurm tests/test_slurm_cluster.py
  Hydra: python launch.py -m hydra/launcher=submitit_slurm hydra.launcher.partition=${PARTITION} ...
  logs: ${LOG_DIR}/ (slurmctld.log, slurmd.log, slurmdbd.log, mariadb.log), ${MUNGE_LOG}
  stop: scripts/slurm_stop.sh   (add --all to stop MariaDB and munged too)
EOF
}

# ---------------------------------------------------------------- already up?
if [[ $RESTART -eq 0 ]] && command -v sinfo >/dev/null 2>&1; then
    if cluster_up; then
        say "cluster already running; nothing to do (use --restart to rebuild it)."
        if [[ $ACCOUNTING == 1 ]] && ! accounting_up; then
            say "note: it runs without accounting; '--restart' starts it with slurmdbd."
        fi
        print_usage
        exit 0
    elif [[ -f $RUN_DIR/slurmctld.pid || -f $RUN_DIR/slurmd.pid ]]; then
        say "cluster partly down ($DOWN_REASON): restarting it from a clean state."
    fi
fi

# ---------------------------------------------------------------- 1. install
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "$* not installed and apt-get is not available"
    say "installing $* with apt-get ..."
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends "$@" >"$APT_LOG" 2>&1; then
        apt-get update -q >>"$APT_LOG" 2>&1 || true
        apt-get install -y -q --no-install-recommends "$@" >>"$APT_LOG" 2>&1 ||
            { tail -n 30 "$APT_LOG" >&2; die "apt-get install $* failed"; }
    fi
}
pkgs=()
command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 || pkgs+=(slurm-wlm)
command -v munged >/dev/null 2>&1 || pkgs+=(munge)
if [[ $ACCOUNTING == 1 ]]; then
    command -v slurmdbd >/dev/null 2>&1 || pkgs+=(slurmdbd)
    command -v mariadbd >/dev/null 2>&1 || pkgs+=(mariadb-server)
fi
((${#pkgs[@]} == 0)) || apt_install "${pkgs[@]}"
SLURMCTLD=$(command -v slurmctld)
SLURMD=$(command -v slurmd)
MUNGED=$(command -v munged)

# Stop what an earlier run of this script started (by the pid files it wrote), so that the
# new configuration and a clean state take effect.
bash "$SCRIPT_DIR/slurm_stop.sh" --quiet || true

# ---------------------------------------------------------------- where this Slurm reads slurm.conf
CONF_DIR=""
if [[ -n ${SLURM_CONF:-} ]]; then
    CONF_DIR=$(dirname "$SLURM_CONF")
else
    lib=$(ldd "$SLURMCTLD" 2>/dev/null | awk '/libslurm/ {print $3; exit}')
    if [[ -n $lib && -f $lib ]]; then
        conf=$(grep -a -o -m1 '/etc/slurm[A-Za-z_-]*/slurm.conf' "$lib" 2>/dev/null | head -n1 || true)
        [[ -n $conf ]] && CONF_DIR=$(dirname "$conf")
    fi
    if [[ -z $CONF_DIR ]]; then
        if [[ -d /etc/slurm-llnl && ! -d /etc/slurm ]]; then CONF_DIR=/etc/slurm-llnl; else CONF_DIR=/etc/slurm; fi
    fi
fi
mkdir -p "$CONF_DIR" "$LOG_DIR" "$RUN_DIR" "$SLURMD_SPOOL"

# ---------------------------------------------------------------- 2. munge
id munge >/dev/null 2>&1 || die "user 'munge' missing (is the munge package installed?)"
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
chown munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 0700 /etc/munge /var/log/munge
chmod 0711 /var/lib/munge
chmod 0755 /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    say "creating munge key"
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile=/etc/munge/munge.key --force
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key

if ! munge_ok; then
    if [[ -f /run/munge/munged.pid ]] && kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null; then
        kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
        sleep 1
    fi
    rm -f /run/munge/munged.pid /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    say "starting munged"
    runuser -u munge -- "$MUNGED" --log-file="$MUNGE_LOG" || fail "munged did not start"
    for _ in $(seq 1 20); do munge_ok && break; sleep 0.25; done
    munge_ok || fail "munge credential round trip (munge -n | unmunge) fails"
fi

# ---------------------------------------------------------------- 3. configuration
short_host=$(hostname -s 2>/dev/null || hostname)
short_host=${short_host%%.*}
if [[ -n ${SLURM_LOCAL_NODENAME:-} ]]; then
    NODE=$SLURM_LOCAL_NODENAME
elif [[ $short_host =~ ^[A-Za-z][A-Za-z0-9-]{0,62}$ ]]; then
    NODE=$short_host # plain host name: keep it (what users expect to see in sinfo)
else
    NODE=localnode # odd characters (_ [ ] , a leading digit ...) break hostlist parsing
fi
# slurmd is started with -N "$NODE" and reached at 127.0.0.1, so the name needs no DNS entry.

NCPU=${SLURM_LOCAL_CPUS:-$(nproc)}
total_mb=$(free -m | awk '/^Mem:/ {print $2}')
MEM_MB=${SLURM_LOCAL_MEM_MB:-$((total_mb * 95 / 100))}

# Use the real topology when it matches the CPU count (avoids "differs from hardware" notes).
TOPO="CPUs=$NCPU"
hw=$("$SLURMD" -C 2>/dev/null | head -n1 || true)
hw_cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
if [[ -n $hw_cpus && $hw_cpus == "$NCPU" ]]; then
    b=$(sed -n 's/.*Boards=\([0-9]*\).*/\1/p' <<<"$hw")
    s=$(sed -n 's/.*SocketsPerBoard=\([0-9]*\).*/\1/p' <<<"$hw")
    c=$(sed -n 's/.*CoresPerSocket=\([0-9]*\).*/\1/p' <<<"$hw")
    t=$(sed -n 's/.*ThreadsPerCore=\([0-9]*\).*/\1/p' <<<"$hw")
    if [[ -n $b && -n $s && -n $c && -n $t ]]; then
        TOPO="CPUs=$NCPU Boards=$b SocketsPerBoard=$s CoresPerSocket=$c ThreadsPerCore=$t"
    fi
fi

# A stale controller state (jobs, node states, a different node name) from an earlier run
# would be replayed by slurmctld: always start from an empty state directory.
rm -rf "$CTLD_STATE"
mkdir -p "$CTLD_STATE"
rm -rf "${SLURMD_SPOOL:?}"/*

if [[ $ACCOUNTING == 1 ]]; then
    ACCT_CONF="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
else
    ACCT_CONF="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi

cat >"$CONF_DIR/slurm.conf" <<EOF
# Written by isdpo scripts/slurm_local.sh -- a single-node test cluster. Rerun the script to regenerate.
ClusterName=$CLUSTER
# "localhost" is accepted by slurmctld as "this machine" whatever the hostname is
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
# a requeued job waits cred_expire seconds before it may start again (default 120)
AuthInfo=cred_expire=15
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
ReturnToService=2
# hardware declared here wins over what slurmd detects (lets SLURM_LOCAL_CPUS oversubscribe)
SlurmdParameters=config_overrides
StateSaveLocation=$CTLD_STATE
SlurmdSpoolDir=$SLURMD_SPOOL
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$CTLD_LOG
SlurmdLogFile=$SLURMD_LOG
SlurmctldDebug=info
SlurmdDebug=info
# scheduling
SchedulerType=sched/backfill
SelectType=select/cons_tres
# cores are consumed, memory is checked against RealMemory at submission but not reserved
SelectTypeParameters=CR_Core
MaxArraySize=100001
MaxJobCount=200000
MinJobAge=300
KillWait=30
InactiveLimit=0
# reject at submission (instead of pending forever) jobs that can never fit the node
EnforcePartLimits=ALL
SlurmctldTimeout=120
SlurmdTimeout=300
Waittime=0
# accounting (sacct) and a text log of finished jobs
$ACCT_CONF
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.log
MailProg=/bin/true
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE $TOPO RealMemory=$MEM_MB State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF

# Only read when a cgroup plugin is configured (it is not); present so that a slurmd that
# looks for it finds something harmless. A cgroup.conf someone else wrote is left alone.
if [[ ! -f $CONF_DIR/cgroup.conf ]] || grep -q 'slurm_local.sh' "$CONF_DIR/cgroup.conf"; then
    cat >"$CONF_DIR/cgroup.conf" <<EOF
# Written by isdpo scripts/slurm_local.sh: cgroups are not used (proctrack/linuxproc, task/none).
ConstrainCores=no
ConstrainRAMSpace=no
EOF
fi
chmod 0644 "$CONF_DIR/slurm.conf" "$CONF_DIR/cgroup.conf"

# ---------------------------------------------------------------- 4a. accounting: MariaDB + slurmdbd
if [[ $ACCOUNTING == 1 ]]; then
    id mysql >/dev/null 2>&1 || die "user 'mysql' missing (is mariadb-server installed?)"
    mkdir -p "$DB_RUN"
    chown mysql:mysql "$DB_RUN"
    if ! db_ok; then
        if [[ ! -d $DB_DATA/mysql ]]; then
            say "initialising a private MariaDB in $DB_DATA"
            rm -rf "$DB_DATA"
            mkdir -p "$DB_DATA"
            chown mysql:mysql "$DB_DATA"
            mariadb-install-db --no-defaults --user=mysql --datadir="$DB_DATA" \
                --auth-root-authentication-method=socket --skip-test-db >"$DB_LOG" 2>&1 ||
                fail "mariadb-install-db failed"
        fi
        touch "$DB_LOG"
        chown mysql:mysql "$DB_LOG"
        say "starting MariaDB (127.0.0.1:$DB_PORT)"
        # --no-defaults: ignore /etc/mysql/*; a system MariaDB on 3306 is left alone
        setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$DB_DATA" \
            --socket="$DB_SOCK" --pid-file="$DB_PID" --bind-address=127.0.0.1 --port="$DB_PORT" \
            --log-error="$DB_LOG" --innodb-buffer-pool-size=64M --skip-name-resolve \
            </dev/null >/dev/null 2>&1 &
        for _ in $(seq 1 120); do db_ok && break; sleep 0.25; done
        db_ok || fail "MariaDB did not start"
    fi
    # fresh accounting database: the controller state is fresh too, so job ids restart at 1
    DB_PASS=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
    db_sql "DROP DATABASE IF EXISTS $DB_NAME; CREATE DATABASE $DB_NAME;
            CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
            ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
            GRANT ALL ON $DB_NAME.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;" ||
        fail "could not create the accounting database"

    umask_old=$(umask)
    umask 077
    cat >"$CONF_DIR/slurmdbd.conf" <<EOF
# Written by isdpo scripts/slurm_local.sh. Rerun the script to regenerate.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
LogFile=$DBD_LOG
PidFile=$DBD_PID
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=$DB_NAME
EOF
    umask "$umask_old"
    chown root:root "$CONF_DIR/slurmdbd.conf"
    chmod 0600 "$CONF_DIR/slurmdbd.conf"

    say "starting slurmdbd"
    slurmdbd || fail "slurmdbd did not start"
    for _ in $(seq 1 120); do
        timeout 5 sacctmgr -n -P show cluster format=cluster >/dev/null 2>&1 && break
        sleep 0.25
    done
    timeout 5 sacctmgr -n -P show cluster format=cluster >/dev/null 2>&1 || fail "slurmdbd does not answer sacctmgr"
    timeout 10 sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null 2>&1 || true
    timeout 5 sacctmgr -n -P show cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER" ||
        fail "cluster $CLUSTER not registered in slurmdbd"
else
    rm -f "$CONF_DIR/slurmdbd.conf"
fi

# ---------------------------------------------------------------- 4b. slurmctld, slurmd
say "config: $CONF_DIR/slurm.conf (node '$NODE': $TOPO RealMemory=${MEM_MB}MB, partition '$PARTITION')"
say "starting slurmctld"
"$SLURMCTLD" -c || fail "slurmctld did not start"
for _ in $(seq 1 40); do
    timeout 5 scontrol ping 2>/dev/null | grep -q UP && break
    sleep 0.25
done
timeout 5 scontrol ping 2>/dev/null | grep -q UP || fail "slurmctld does not answer scontrol ping"

say "starting slurmd (node $NODE)"
"$SLURMD" -N "$NODE" || fail "slurmd did not start"

# ---------------------------------------------------------------- 5. wait until usable
deadline=$((SECONDS + TIMEOUT))
state=""
while ((SECONDS < deadline)); do
    state=$(node_state)
    usable_state "$state" && break
    case "$state" in
        down* | drain* | *drain | *fail*)
            # a node that registered after a restart can be left DOWN; resume it once it answers
            timeout 5 scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
            ;;
    esac
    sleep 0.5
done
usable_state "$state" || fail "node '$NODE' did not become idle within ${TIMEOUT}s (state: '${state:-no answer}')"
say "node '$NODE' is $state; running test jobs"

left=$((deadline - SECONDS))
((left < 10)) && left=10
out=$(cd /tmp && timeout "$left" srun -N1 -n1 -t 1 -J slurm_local_check hostname 2>&1) ||
    fail "test job 'srun hostname' failed: $out"
# (sbatch --wait polls with a growing interval: ~10 s for a job that takes 0.1 s; poll ourselves)
jid=$(cd /tmp && timeout 10 sbatch --parsable -t 1 -J slurm_local_check -o /dev/null --wrap true 2>&1) ||
    fail "sbatch failed: $jid"
jid=${jid%%;*}
jstate=""
while ((SECONDS < deadline + 10)); do
    jstate=$(timeout 5 scontrol -o show job "$jid" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p' || true)
    case "$jstate" in
        COMPLETED) break ;;
        FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY | BOOT_FAIL | DEADLINE | PREEMPTED)
            fail "test batch job $jid ended $jstate" ;;
    esac
    sleep 0.3
done
[[ $jstate == COMPLETED ]] || fail "test batch job $jid did not complete in time (state: '${jstate:-unknown}')"

if [[ $ACCOUNTING == 1 ]]; then
    # the controller sends job records to slurmdbd asynchronously: wait until sacct sees ours
    acct_state=""
    while ((SECONDS < deadline + 20)); do
        acct_state=$(timeout 5 sacct -n -X -P -j "$jid" -o State 2>/dev/null | head -n1 || true)
        [[ $acct_state == COMPLETED ]] && break
        sleep 0.5
    done
    [[ $acct_state == COMPLETED ]] || fail "sacct does not report test job $jid (got '${acct_state}')"
fi
say "test jobs ok (srun, sbatch$([[ $ACCOUNTING == 1 ]] && echo ', sacct'))."
print_usage
