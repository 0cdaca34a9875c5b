#!/usr/bin/env bash
# Stop the single-node SLURM cluster started by scripts/slurm_local.sh.
#
#   sudo scripts/slurm_stop.sh          # cancel jobs, stop slurmd, slurmctld, slurmdbd
#   sudo scripts/slurm_stop.sh --all    # also stop the private MariaDB and munged
#
# Only the processes named in the pid files the cluster wrote are signalled.
set -uo pipefail

if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        exec sudo -E bash "$0" "$@"
    fi
    echo "slurm_stop.sh: must run as root (no sudo found)" >&2
    exit 1
fi

ALL=0
QUIET=0
for arg in "$@"; do
    case "$arg" in
        --all) ALL=1 ;;
        --quiet) QUIET=1 ;;
        -h | --help) sed -n '2,8p' "$0"; exit 0 ;;
        *) echo "slurm_stop.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done

RUN_DIR=/run/slurm-local
say() { [[ $QUIET -eq 1 ]] || echo "[slurm_stop] $*"; }

stop_pidfile() { # name pidfile
    local name=$1 pidfile=$2 pid
    if [[ ! -f $pidfile ]]; then
        say "$name: no pid file ($pidfile)"
        return 0
    fi
    pid=$(cat "$pidfile" 2>/dev/null || true)
    if [[ -z $pid ]] || ! kill -0 "$pid" 2>/dev/null; then
        say "$name: not running"
        rm -f "$pidfile"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.25
    done
    if kill -0 "$pid" 2>/dev/null; then
        say "$name (pid $pid) ignored SIGTERM for 15 s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    rm -f "$pidfile"
    say "$name (pid $pid) stopped"
}

# Cancel jobs first so that their steps do not outlive slurmd.
if command -v scancel >/dev/null 2>&1 && [[ -f $RUN_DIR/slurmctld.pid ]]; then
    timeout 10 bash -c 'for u in $(squeue -h -o %u 2>/dev/null | sort -u); do scancel --quiet --user="$u"; done' >/dev/null 2>&1 || true
fi
stop_pidfile slurmd "$RUN_DIR/slurmd.pid"
stop_pidfile slurmctld "$RUN_DIR/slurmctld.pid"
stop_pidfile slurmdbd "$RUN_DIR/slurmdbd.pid"
if [[ $ALL -eq 1 ]]; then
    stop_pidfile mariadb "$RUN_DIR/mariadb/mariadb.pid"
    stop_pidfile munged /run/munge/munged.pid
fi
exit 0
