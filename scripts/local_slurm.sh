#!/usr/bin/env bash
# A throw-away Slurm cluster of NODES nodes on this one machine (tests, trials).
#
#   NODES=2 scripts/local_slurm.sh up       # start it (idempotent), print how to submit
#   scripts/local_slurm.sh status           # daemons and sinfo; exit 1 if not up
#   scripts/local_slurm.sh down             # stop it, remove its files and /etc/hosts line
#
# Everything lives in LOCAL_SLURM_DIR (/tmp/liquid-slurm): its own slurm.conf,
# munge key and socket, state, spool, logs. Clients reach it through
# SLURM_CONF=$LOCAL_SLURM_DIR/slurm.conf only; a Slurm or munge already set up
# on the machine is never read, written or stopped (the daemons get `-f` and
# their own munge socket, and /etc/slurm is not touched). The one system file
# changed is /etc/hosts: one line, marked with this cluster's directory, maps
# the node names (PREFIX1..PREFIXn) to 127.0.0.1 so that they resolve like the
# hosts of a real allocation (slurm/pretrain.sh's rendezvous uses the first
# one); `down` removes exactly that line. Must run as root (SlurmUser=root, and
# /etc/hosts). Variables:
#   NODES             number of nodes                        (2)
#   LOCAL_SLURM_DIR   the cluster's directory                (/tmp/liquid-slurm)
#   LOCAL_SLURM_PORT  slurmctld port; node i listens on +i   (16817)
#   NODE_PREFIX       node names are PREFIX1..PREFIXn        (lq)
#   NODE_CPUS         CPUs each node announces               (2)
#   NODE_MEM_MB       memory each node announces, in MB      (this machine's / NODES)
#   CRED_EXPIRE       credential lifetime, in seconds; also the delay before a
#                     requeued job may start again (Slurm's default: 120)   (5)
# Sandbox settings: ProctrackType=proctrack/linuxproc and TaskPlugin=task/none
# (no cgroups), SelectType=select/cons_tres, SlurmUser=root.
set -euo pipefail

ACTION="${1:-}"
DIR="${LOCAL_SLURM_DIR:-/tmp/liquid-slurm}"
NODES="${NODES:-2}"
PORT="${LOCAL_SLURM_PORT:-16817}"
PREFIX="${NODE_PREFIX:-lq}"
CPUS="${NODE_CPUS:-2}"
MEM_MB="${NODE_MEM_MB:-}"
CRED_EXPIRE="${CRED_EXPIRE:-5}"
CONF="$DIR/slurm.conf"
HOSTS=/etc/hosts
MARK="# local_slurm.sh $DIR"

die() { echo "local_slurm.sh: $*" >&2; exit 1; }

usage() { die "usage: [NODES=n] $0 up|down|status"; }

node_names() {
    local i
    for ((i = 1; i <= NODES; i++)); do printf '%s%d\n' "$PREFIX" "$i"; done
}

alive() {  # alive PIDFILE: the daemon of that pid file runs
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

our_pidfiles() {
    local f
    for f in "$DIR"/run/*.pid; do [ -e "$f" ] && echo "$f"; done
}

hosts_without_our_line() { grep -vF -- "$MARK" "$HOSTS" || true; }

remove_hosts_line() {
    # rewrite in place (not a rename): /etc/hosts may be a bind mount
    local kept
    kept="$(hosts_without_our_line)"
    printf '%s\n' "$kept" > "$HOSTS"
}

add_hosts_line() {
    remove_hosts_line
    echo "127.0.0.1 $(node_names | tr '\n' ' ')$MARK" >> "$HOSTS"
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

write_conf() {
    local host i name mem
    host="$(hostname -s)"
    mem="${MEM_MB:-$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 / NODES ))}"
    cat > "$CONF" <<EOF
# written by scripts/local_slurm.sh; removed by its 'down'
ClusterName=liquid-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=$CRED_EXPIRE
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
PlugStackConfig=$DIR/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
# finished jobs stay visible to scontrol for 10 minutes
MinJobAge=600
SchedulerParameters=sched_interval=2
EOF
    i=0
    while read -r name; do
        i=$((i + 1))
        echo "NodeName=$name NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT + i))" \
             "CPUs=$CPUS RealMemory=$mem State=UNKNOWN" >> "$CONF"
    done < <(node_names)
    echo "PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >> "$CONF"
    : > "$DIR/plugstack.conf"
}

wait_idle() {  # every node idle within 60 s
    local deadline=$((SECONDS + 60)) states
    while :; do
        states="$(SLURM_CONF="$CONF" sinfo -h -N -o '%N %T' 2>/dev/null || true)"
        if [ "$(grep -c ' idle$' <<< "$states")" -eq "$NODES" ]; then return 0; fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            die "nodes not idle after 60 s: ${states:-no answer from slurmctld}; logs in $DIR/log"
        fi
        sleep 0.5
    done
}

up() {
    [ "$(id -u)" -eq 0 ] || die "must run as root (SlurmUser=root; node names go to $HOSTS)"
    local cmd
    for cmd in munged mungekey slurmctld slurmd sinfo; do
        command -v "$cmd" > /dev/null \
            || die "$cmd not found: apt-get install -y slurm-wlm munge (.ci/run does)"
    done
    [[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "NODES must be a positive integer, not '$NODES'"
    [[ "$PORT" =~ ^[0-9]+$ ]] || die "LOCAL_SLURM_PORT must be a port number, not '$PORT'"
    if [ -f "$CONF" ] && status > /dev/null 2>&1; then
        echo "local_slurm.sh: already up ($CONF)"
        instructions
        return 0
    fi
    if [ -e "$DIR" ]; then
        [ -f "$CONF" ] || die "$DIR exists and is not a local_slurm.sh cluster; set LOCAL_SLURM_DIR"
        down > /dev/null  # a cluster left half up: start afresh
    fi
    local p
    for ((p = PORT; p <= PORT + NODES; p++)); do
        if port_in_use "$p"; then die "port $p is in use; set LOCAL_SLURM_PORT"; fi
    done
    mkdir -p "$DIR"/{munge,state,spool,run,log}
    chmod 700 "$DIR/munge"
    mungekey --create --keyfile="$DIR/munge/munge.key"
    munged --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munged.seed"
    write_conf
    add_hosts_line
    SLURM_CONF="$CONF" slurmctld -f "$CONF"
    local name
    while read -r name; do
        SLURM_CONF="$CONF" slurmd -f "$CONF" -N "$name"
    done < <(node_names)
    wait_idle
    instructions
}

instructions() {
    cat <<EOF
local Slurm cluster up: $(node_names | tr '\n' ' ')(config $CONF)
submit with:  SLURM_CONF=$CONF sbatch ...   (likewise srun, squeue, scontrol, scancel)
stop with:    LOCAL_SLURM_DIR=$DIR $0 down
EOF
}

status() {
    [ -f "$CONF" ] || { echo "local_slurm.sh: no cluster in $DIR"; return 1; }
    local f ok=0
    while read -r f; do
        if alive "$f"; then
            echo "$(basename "$f" .pid): running (pid $(cat "$f"))"
        else
            echo "$(basename "$f" .pid): not running"
            ok=1
        fi
    done < <(our_pidfiles)
    [ -s "$DIR/run/slurmctld.pid" ] || { echo "slurmctld: never started"; ok=1; }
    SLURM_CONF="$CONF" sinfo -N -o '%N %T %c' || ok=1
    return "$ok"
}

down() {
    if [ -e "$DIR" ] && [ ! -f "$CONF" ]; then
        die "$DIR is not a local_slurm.sh cluster (no slurm.conf); not removing it"
    fi
    if [ -f "$CONF" ] && alive "$DIR/run/slurmctld.pid"; then
        # jobs first: their slurmstepd processes would outlive the slurmd daemons
        SLURM_CONF="$CONF" scancel --quiet --full --signal=KILL --partition=local || true
        local deadline=$((SECONDS + 30))
        while [ -n "$(SLURM_CONF="$CONF" squeue -h -o %i 2>/dev/null)" ] \
                && [ "$SECONDS" -lt "$deadline" ]; do
            sleep 0.5
        done
    fi
    local f pids=()
    while read -r f; do
        if alive "$f"; then pids+=("$(cat "$f")"); kill -TERM "$(cat "$f")"; fi
    done < <(our_pidfiles)
    local pid deadline=$((SECONDS + 30))
    for pid in "${pids[@]}"; do
        while kill -0 "$pid" 2>/dev/null; do
            if [ "$SECONDS" -ge "$deadline" ]; then kill -KILL "$pid" 2>/dev/null || true; fi
            sleep 0.2
        done
    done
    if grep -qF -- "$MARK" "$HOSTS" 2>/dev/null; then remove_hosts_line; fi
    rm -rf "$DIR"
    echo "local_slurm.sh: down ($DIR removed)"
}

case "$ACTION" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) usage ;;
esac
