#!/usr/bin/env bash
# A one-machine SLURM cluster (slurmctld + slurmd + slurmdbd over a local MariaDB, munge auth) to try eva_bench's
# cluster path on a laptop or in a test, with no systemd. Debian/Ubuntu, as root.
#
#   cluster/slurm-single-node.sh start    # install what is missing (apt-get), start what is not running, wait idle
#   cluster/slurm-single-node.sh stop     # stop the daemons that `start` started (by their pids), nothing else
#   cluster/slurm-single-node.sh status   # sinfo, and which daemons run
#
# Daemons that already run are reused and left running by `stop`; the ones `start` started are listed, with their
# pid files, in $EVA_BENCH_SLURM_STATE/started (default /run/eva-bench-slurm), which `stop` reads. Two callers that
# must not stop each other's daemons give different EVA_BENCH_SLURM_STATE folders (tests/test_slurm.py does).
# The node's name, CPU count and memory are read from this machine; the partition is EVA_BENCH_SLURM_PARTITION
# (default `cpu`), CPU-only: submit to it with hydra/launcher=slurm_cpu.
# Exit status 77: this machine cannot run the cluster (not root, or no SLURM and no apt-get); the reason is printed.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STATE=${EVA_BENCH_SLURM_STATE:-/run/eva-bench-slurm}   # where `start` lists what it started, for `stop`
PARTITION=${EVA_BENCH_SLURM_PARTITION:-cpu}            # the CPU-only partition's name
RUN=/run/slurm                                          # SLURM daemons' pid files
CONF=/etc/slurm                                         # Debian's SLURM config folder (the client commands read it)
MARK="Written by cluster/slurm-single-node.sh"          # first line of the configs we own; others are never touched
PACKAGES="slurm-wlm slurmdbd munge mariadb-server"

say() { echo "slurm-single-node: $*"; }
cannot() { say "cannot run here: $*" >&2; exit 77; }
die() { say "error: $*" >&2; exit 1; }

alive() {  # alive <pidfile> <command name>: the pid file names a live process of that command
    local pid
    [ -s "$1" ] && pid=$(cat "$1") && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$2" ]
}

wait_for() {  # wait_for <seconds> <what> <command...>: poll until the command succeeds
    local seconds=$1 what=$2; shift 2
    for _ in $(seq $((seconds * 2))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
    die "$what did not come up in ${seconds}s (logs: /var/log/slurm/, /var/log/mysql/)"
}

started() { echo "$1 $2 $3" >> "$STATE/started"; say "started $1 (pid $(cat "$2"))"; }

install() {
    [ "$(id -u)" = 0 ] || cannot "needs root (daemons, /etc/slurm, apt-get)"
    local missing=""
    for cmd in slurmctld slurmd slurmdbd sinfo munged mariadbd; do
        command -v "$cmd" >/dev/null || missing="$missing $cmd"
    done
    [ -z "$missing" ] && return 0
    command -v apt-get >/dev/null || cannot "no$missing and no apt-get to install them ($PACKAGES)"
    say "installing $PACKAGES (missing:$missing)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq $PACKAGES >/dev/null || { apt-get update -qq && apt-get install -y -qq $PACKAGES >/dev/null; } \
        || cannot "apt-get could not install $PACKAGES"
}

write_conf() {  # write_conf <template> <target> <mode>: fill in this machine, refuse to overwrite a foreign config
    local target=$2
    if [ -e "$target" ] && ! head -1 "$target" | grep -q "$MARK"; then
        die "$target exists and was not written by this script: move it aside to use the test cluster"
    fi
    local cpus memory
    cpus=$(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' | head -1)
    memory=$(( $(awk '/^MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))  # below the machine's, or slurmd refuses
    local per_cpu=$(( memory / cpus < 4000 ? memory / cpus : 4000 ))
    sed -e "s/@HOST@/$(hostname -s)/g" -e "s/@CPUS@/$cpus/g" -e "s/@MEMORY@/$memory/g" -e "s/@MEMPERCPU@/$per_cpu/g" \
        -e "s/@PARTITION@/$PARTITION/g" -e "s|@RUN@|$RUN|g" -e "s/@DBPASS@/$DBPASS/g" "$1" > "$target.tmp"
    chmod "$3" "$target.tmp"
    mv "$target.tmp" "$target"
}

running() {  # a whole cluster answers: controller up, accounting (sacct) up, the node usable
    command -v scontrol >/dev/null && scontrol ping 2>/dev/null | grep -q "is UP" && sacct -n -X >/dev/null 2>&1 \
        && sinfo -h -N -o %T 2>/dev/null | grep -qE "^(idle|mixed|allocated|completing)"
}

start() {
    # a running cluster is reused as it is, without root (nothing is started, so `stop` will stop nothing)
    if running; then say "reusing the running cluster"; sinfo; return 0; fi
    install
    mkdir -p "$STATE" "$RUN" "$CONF" /var/log/slurm /var/spool/slurmctld /var/spool/slurmd /run/munge /run/mysqld
    touch "$STATE/started"

    # munge: the authentication every SLURM daemon and command uses
    if ! alive /run/munge/munged.pid munged; then
        [ -s /etc/munge/munge.key ] || { mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
            || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; }
        chown munge:munge /etc/munge/munge.key /run/munge && chmod 400 /etc/munge/munge.key
        runuser -u munge -- munged --pid-file=/run/munge/munged.pid
        wait_for 10 munged munge -n
        started munged /run/munge/munged.pid munged
    fi

    # MariaDB: slurmdbd's storage (job accounting, which sacct and so submitit read)
    if ! alive /run/mysqld/mysqld.pid mariadbd; then
        [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql >/dev/null
        chown mysql:mysql /run/mysqld
        setsid mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid --socket=/run/mysqld/mysqld.sock \
            --log-error=/var/log/mysql/error.log </dev/null >/dev/null 2>&1 &
        wait_for 60 mariadbd mariadb-admin --socket=/run/mysqld/mysqld.sock ping
        wait_for 10 "mariadbd's pid file" test -s /run/mysqld/mysqld.pid
        started mariadbd /run/mysqld/mysqld.pid mariadbd
    fi
    # a local throwaway user for slurmdbd, its password kept beside the state (created once per machine)
    [ -s /etc/slurm/.eva-bench-dbpass ] || head -c 18 /dev/urandom | base64 | tr -d '/+=' > /etc/slurm/.eva-bench-dbpass
    chmod 600 /etc/slurm/.eva-bench-dbpass
    DBPASS=$(cat /etc/slurm/.eva-bench-dbpass)
    mariadb --socket=/run/mysqld/mysqld.sock -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
        ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DBPASS'; CREATE DATABASE IF NOT EXISTS slurm_acct_db;
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"

    # slurm.conf first: every client command (sacctmgr below included) reads it to find the daemons
    alive "$RUN/slurmctld.pid" slurmctld || write_conf "$HERE/slurm.conf.in" "$CONF/slurm.conf" 644
    if ! alive "$RUN/slurmdbd.pid" slurmdbd; then
        write_conf "$HERE/slurmdbd.conf.in" "$CONF/slurmdbd.conf" 600
        slurmdbd
        wait_for 30 slurmdbd sacctmgr -n list cluster
        started slurmdbd "$RUN/slurmdbd.pid" slurmdbd
    fi
    sacctmgr -n -P list cluster format=cluster | grep -qx evabench || sacctmgr -i add cluster evabench >/dev/null

    if ! alive "$RUN/slurmctld.pid" slurmctld; then
        slurmctld
        wait_for 30 slurmctld scontrol ping
        started slurmctld "$RUN/slurmctld.pid" slurmctld
    fi
    if ! alive "$RUN/slurmd.pid" slurmd; then
        slurmd
        wait_for 30 slurmd test -s "$RUN/slurmd.pid"
        started slurmd "$RUN/slurmd.pid" slurmd
    fi
    # a node left down or drained by an earlier, killed run comes back
    for _ in $(seq 60); do
        case $(sinfo -h -N -o %T | head -1) in
            idle|mixed|allocated|completing) say "cluster up: partition $PARTITION on $(hostname -s)"; sinfo; return 0 ;;
            down*|drain*) scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 1
    done
    die "the node did not become idle: $(sinfo -h -N -o '%T %E')"
}

stop() {
    [ -s "$STATE/started" ] || { say "nothing to stop: $STATE/started lists no daemon this script started"; return 0; }
    # in reverse order of starting: slurmd, slurmctld, slurmdbd, mariadbd, munged
    tac "$STATE/started" | while read -r name pidfile command; do
        if alive "$pidfile" "$command"; then
            local pid; pid=$(cat "$pidfile")
            kill "$pid"
            for _ in $(seq 60); do [ -d "/proc/$pid" ] || break; sleep 0.5; done
            [ -d "/proc/$pid" ] && kill -9 "$pid"
            say "stopped $name (pid $pid)"
        fi
    done
    rm -f "$STATE/started"
}

status() {
    for d in munged:/run/munge/munged.pid mariadbd:/run/mysqld/mysqld.pid slurmdbd:$RUN/slurmdbd.pid \
             slurmctld:$RUN/slurmctld.pid slurmd:$RUN/slurmd.pid; do
        alive "${d#*:}" "${d%%:*}" && say "${d%%:*} running (pid $(cat "${d#*:}"))" || say "${d%%:*} not running"
    done
    command -v sinfo >/dev/null && sinfo 2>&1 || true
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
