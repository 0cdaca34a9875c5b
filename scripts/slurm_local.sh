#!/usr/bin/env bash
# Start a real single-node SLURM cluster on this machine (for tests and CI).
#
#   sudo scripts/slurm_local.sh            # install if needed, configure, start, wait until a job runs
#   sudo scripts/slurm_local.sh --restart  # stop our daemons, wipe the controller state, start fresh
#   sudo scripts/slurm_stop.sh             # stop slurmd + slurmctld (add --all to stop munged too)
#
# Idempotent: if the cluster already answers (sinfo shows the node usable) it says so and exits 0.
# Needs root (re-runs itself with sudo when that exists). Debian/Ubuntu only (apt-get).
#
# What it does, in order:
#   1. apt-get install slurm-wlm munge   (only when slurmctld is missing)
#   2. a munge key (mungekey, or 1 KiB from /dev/urandom) owned by munge, mode 0400
#   3. slurm.conf (+ an inert cgroup.conf) in the directory this Slurm build reads:
#      one node (this machine's CPUs and ~95% of its memory), partition `debug` (default,
#      MaxTime=INFINITE), job arrays up to MaxArraySize, no accounting database, no GRES.
#   4. munged, slurmctld (with a freshly emptied state dir), slurmd started as daemons
#   5. waits (SLURM_LOCAL_TIMEOUT s, default 60) for the node to be idle and for
#      `srun hostname` and a batch job to succeed; prints the daemon logs on failure.
#
# Environment overrides (all optional):
#   SLURM_LOCAL_TIMEOUT   seconds to wait for the cluster (default 60)
#   SLURM_LOCAL_NODENAME  node name (default: short hostname when it is a plain name, else "localnode")
#   SLURM_LOCAL_CPUS      CPUs to declare (default: nproc). More than the hardware has is allowed
#                         (SlurmdParameters=config_overrides) to run more 1-CPU jobs side by side.
#   SLURM_LOCAL_MEM_MB    RealMemory to declare (default: 95% of `free -m` total)
#   SLURM_LOCAL_STATE     state/spool base dir (default /var/lib/slurm-local)
#   SLURM_LOCAL_LOGS      log dir (default /var/log/slurm-local)
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        exec sudo -E bash "$0" "$@"
    fi
    echo "slurm_local.sh: must run as root (no sudo found)" >&2
    exit 1
fi

RESTART=0
for arg in "$@"; do
    case "$arg" in
        --restart) RESTART=1 ;;
        -h | --help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "slurm_local.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done

TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}
STATE_BASE=${SLURM_LOCAL_STATE:-/var/lib/slurm-local}
LOG_DIR=${SLURM_LOCAL_LOGS:-/var/log/slurm-local}
RUN_DIR=/run/slurm-local
CTLD_STATE=$STATE_BASE/slurmctld
SLURMD_SPOOL=$STATE_BASE/slurmd
CTLD_PID=$RUN_DIR/slurmctld.pid
SLURMD_PID=$RUN_DIR/slurmd.pid
CTLD_LOG=$LOG_DIR/slurmctld.log
SLURMD_LOG=$LOG_DIR/slurmd.log
MUNGE_LOG=/var/log/munge/munged.log
PARTITION=debug

say() { echo "[slurm_local] $*"; }
die() { echo "[slurm_local] ERROR: $*" >&2; exit 1; }

dump_logs() {
    local f
    for f in "$MUNGE_LOG" "$CTLD_LOG" "$SLURMD_LOG"; do
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

pid_alive() { # pidfile -> 0 when the process in it runs
    [[ -f $1 ]] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null
}

munge_ok() { command -v munge >/dev/null 2>&1 && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

node_state() { # prints the node's state (lower case) or nothing
    timeout 5 sinfo -h -N -o '%T' 2>/dev/null | head -n1 | tr '[:upper:]' '[:lower:]' || true
}

cluster_up() {
    munge_ok || return 1
    timeout 5 scontrol ping 2>/dev/null | grep -q 'UP' || return 1
    case "$(node_state)" in
        idle | mixed | allocated | completing | idle+* | mixed+* | allocated+*) return 0 ;;
        *) return 1 ;;
    esac
}

print_usage() {
    local node
    node=$(timeout 5 sinfo -h -N -o '%N' 2>/dev/null | head -n1 || true)
    cat <<EOF
[slurm_local] SLURM cluster is up: node '${node}', partition '${PARTITION}' (default).
  sinfo; squeue                        # look at it
  sbatch --wrap 'hostname' ; srun true # submit
  python -m pytest -m slurm tests/test_slurm_cluster.py
  Hydra: python launch.py -m hydra/launcher=submitit_slurm hydra.launcher.partition=${PARTITION} ...
  logs: ${LOG_DIR}/ (slurmctld.log, slurmd.log), ${MUNGE_LOG}
  stop: scripts/slurm_stop.sh   (add --all to stop munged too)
  note: no accounting database; sacct fails, submitit warns about it and still returns results.
EOF
}

# ---------------------------------------------------------------- already up?
if [[ $RESTART -eq 0 ]] && command -v sinfo >/dev/null 2>&1 && cluster_up; then
    say "cluster already running; nothing to do."
    print_usage
    exit 0
fi

# ---------------------------------------------------------------- 1. install
if ! command -v slurmctld >/dev/null 2>&1 || ! command -v slurmd >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || die "slurmctld is not installed and apt-get is not available"
    say "installing slurm-wlm and munge with apt-get ..."
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends slurm-wlm munge >/tmp/slurm_local_apt.log 2>&1; then
        apt-get update -q >>/tmp/slurm_local_apt.log 2>&1 || true
        apt-get install -y -q --no-install-recommends slurm-wlm munge >>/tmp/slurm_local_apt.log 2>&1 ||
            { tail -n 30 /tmp/slurm_local_apt.log >&2; die "apt-get install slurm-wlm munge failed"; }
    fi
fi
SLURMCTLD=$(command -v slurmctld)
SLURMD=$(command -v slurmd)
MUNGED=$(command -v munged)

# Debian packaging may have started daemons through init scripts (not here without systemd,
# but be safe): we manage our own; stop only what we started earlier (our pid files).
"$(dirname "$0")/slurm_stop.sh" --quiet 2>/dev/null || true

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
mkdir -p "$CONF_DIR"

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
    if pid_alive /run/munge/munged.pid; then
        kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
        sleep 1
    fi
    rm -f /run/munge/munged.pid /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    say "starting munged"
    runuser -u munge -- "$MUNGED" --log-file="$MUNGE_LOG" ||
        runuser -u munge -- "$MUNGED" || fail "munged did not start"
    for _ in $(seq 1 20); do munge_ok && break; sleep 0.25; done
    munge_ok || fail "munge credential round trip (munge -n | unmunge) fails"
fi

# ---------------------------------------------------------------- 3. slurm.conf
short_host=$(hostname -s 2>/dev/null || hostname)
short_host=${short_host%%.*}
if [[ -n ${SLURM_LOCAL_NODENAME:-} ]]; then
    NODE=$SLURM_LOCAL_NODENAME
elif [[ $short_host =~ ^[A-Za-z][A-Za-z0-9-]{0,62}$ ]]; then
    NODE=$short_host # plain host name: keep it (what users expect to see in sinfo)
else
    NODE=localnode # odd characters (_ [ ] , digits first ...) break hostlist parsing
fi

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

mkdir -p "$LOG_DIR" "$RUN_DIR" "$SLURMD_SPOOL"
# A stale controller state (jobs, node states, a different node name) from an earlier run
# would be replayed by slurmctld: always start from an empty state directory.
rm -rf "$CTLD_STATE"
mkdir -p "$CTLD_STATE"
rm -rf "${SLURMD_SPOOL:?}"/*

cat >"$CONF_DIR/slurm.conf" <<EOF
# Written by isdpo scripts/slurm_local.sh -- a single-node test cluster. Rerun the script to regenerate.
ClusterName=isdpo-local
# "localhost" is accepted by slurmctld as "this machine" whatever the hostname is
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CryptoType=crypto/munge
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
# scheduling: quick turnaround for tests
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MaxArraySize=100001
MaxJobCount=200000
MinJobAge=300
KillWait=30
InactiveLimit=0
# reject at submission (not pend forever) jobs that can never fit the node or partition
EnforcePartLimits=ALL
SlurmctldTimeout=120
SlurmdTimeout=300
Waittime=0
# no accounting database (sacct reports that accounting is disabled); a text log of finished jobs
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.log
MailProg=/bin/true
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE $TOPO RealMemory=$MEM_MB State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF

# Only read when a cgroup plugin is configured (it is not); present so that a slurmd that
# looks for it finds something harmless.
if [[ ! -f $CONF_DIR/cgroup.conf ]] || grep -q 'slurm_local.sh' "$CONF_DIR/cgroup.conf"; then
    cat >"$CONF_DIR/cgroup.conf" <<EOF
# Written by isdpo scripts/slurm_local.sh: cgroups are not used (proctrack/linuxproc, task/none).
ConstrainCores=no
ConstrainRAMSpace=no
EOF
fi
chmod 0644 "$CONF_DIR/slurm.conf" "$CONF_DIR/cgroup.conf"

# ---------------------------------------------------------------- 4. start daemons
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
    case "$state" in
        idle | mixed | allocated | idle+* | mixed+*) break ;;
        down* | drain* | *drain | *fail*)
            # a node that registered after a restart can be left DOWN; resume it once it answers
            timeout 5 scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
            ;;
    esac
    sleep 0.5
done
case "$state" in
    idle | mixed | allocated | idle+* | mixed+*) ;;
    *) fail "node '$NODE' did not become idle within ${TIMEOUT}s (state: '${state:-no answer}')" ;;
esac
say "node '$NODE' is $state; running test jobs"

left=$((deadline - SECONDS))
((left < 10)) && left=10
out=$(timeout "$left" srun -N1 -n1 -t 1 -J slurm_local_check hostname 2>&1) ||
    fail "test job 'srun hostname' failed: $out"
left=$((deadline - SECONDS))
((left < 10)) && left=10
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
say "test jobs ok (srun and sbatch)."
print_usage
