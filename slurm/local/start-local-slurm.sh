#!/usr/bin/env bash
# start-local-slurm.sh - bring up a real single-node SLURM cluster on localhost
# (Debian bookworm, root, no systemd: every daemon is started by hand).
#
# Idempotent: installs packages only if missing, (re)writes config only if it
# changed, starts only daemons that are not already up. PIDs of the daemons this
# script starts are recorded in $SLURM_LOCAL_STATE (default /run/local-slurm);
# stop-local-slurm.sh kills exactly those PIDs and nothing else.
#
# Environment knobs (all optional):
#   SLURM_ACCOUNTING=1    1: also run MariaDB + slurmdbd so `sacct` works (submitit
#                         uses sacct to see jobs that die without a result, e.g.
#                         scancel/timeout). 0: no accounting (sacct errors out).
#   SLURM_NODE_NAME=...   node name (default: `hostname -s`); "localhost" also works.
#   SLURM_PARTITION=debug partition name (Default=YES).
#   SLURM_CPUS=N          CPUs to advertise (default: nproc).
#   SLURM_MEM_MB=N        RealMemory (default: 95% of what `slurmd -C` reports).
#   SLURM_START_TIMEOUT=60 seconds to wait for each daemon.
#   SLURM_SMOKE_TEST=1    run `srun -N1 -n1 hostname` at the end (0 to skip).
#   SLURM_DB_PASS=...     password for the local 'slurm' MariaDB user.
#   SLURM_KILL_WAIT=30    KillWait: seconds between SIGTERM and SIGKILL on scancel/timeout
#                         (Slurm's default; submitit jobs ignore SIGTERM, so a cancelled
#                         submitit job lingers this long in CG state).
set -euo pipefail

ACCOUNTING=${SLURM_ACCOUNTING:-1}
NODE=${SLURM_NODE_NAME:-$(hostname -s)}
PARTITION=${SLURM_PARTITION:-debug}
CPUS=${SLURM_CPUS:-$(nproc)}
TIMEOUT=${SLURM_START_TIMEOUT:-60}
SMOKE=${SLURM_SMOKE_TEST:-1}
KILL_WAIT=${SLURM_KILL_WAIT:-30}
DB_PASS=${SLURM_DB_PASS:-local-slurm-pw}
STATE=${SLURM_LOCAL_STATE:-/run/local-slurm}
CONF_DIR=/etc/slurm
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm
T0=$(date +%s.%N)

elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
log()  { printf '[start-local-slurm %6ss] %s\n' "$(elapsed "$T0")" "$*"; }
die()  { printf '[start-local-slurm] ERROR: %s\n' "$*" >&2; exit 1; }
tail_log() { # tail_log FILE: dump the end of a log to stderr to explain a failure
  [ -f "$1" ] && { echo "----- last lines of $1 -----" >&2; tail -n 25 "$1" >&2; echo "-----" >&2; } || true
}

[ "$(id -u)" = 0 ] || die "must run as root (daemons need to setuid to job owners)"
[[ "$CPUS" =~ ^[1-9][0-9]*$ ]] || die "SLURM_CPUS must be a positive integer (got '$CPUS')"
[[ -z "${SLURM_MEM_MB:-}" || "${SLURM_MEM_MB}" =~ ^[1-9][0-9]*$ ]] \
  || die "SLURM_MEM_MB must be a positive integer in MB (got '$SLURM_MEM_MB')"
[[ "$ACCOUNTING" = 0 || "$ACCOUNTING" = 1 ]] || die "SLURM_ACCOUNTING must be 0 or 1"

# ---------------------------------------------------------------- helpers ---
# ours NAME BINARY -> pid of a live daemon this script started, else empty
ours() {
  local f="$STATE/$1.pid" pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat /proc/$pid/comm)" = "$2" ]; then
    echo "$pid"
  else
    rm -f "$f"   # stale record (process gone or pid reused)
  fi
}
# record NAME PIDFILE BINARY: copy the daemon's own pid file into our state dir
record() {
  local pid
  pid=$(cat "$2" 2>/dev/null || true)
  [ -n "$pid" ] && [ "$(cat /proc/$pid/comm 2>/dev/null)" = "$3" ] \
    || die "$3 did not write a valid pid file $2"
  echo "$pid" > "$STATE/$1.pid"
}
# wait_for DESCRIPTION CMD...: poll CMD until it succeeds or TIMEOUT expires
wait_for() {
  local what=$1; shift
  local end=$(( $(date +%s) + TIMEOUT ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || return 1
    sleep 0.3
  done
  log "$what: ready"
}
foreign() { # foreign BINARY OURPID -> pids of same-named processes not started by us
  pgrep -x "$1" | grep -vx "${2:-none}" || true
}
# stop_ours NAME BINARY (used when config changed under a running daemon)
stop_ours() {
  local pid; pid=$(ours "$1" "$2")
  [ -n "$pid" ] || return 0
  log "restarting $2 (pid $pid) because its config changed"
  kill "$pid"
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -0 "$pid" 2>/dev/null && die "$2 (pid $pid) did not exit after SIGTERM"
  rm -f "$STATE/$1.pid"
}

mkdir -p "$STATE" "$LOG_DIR"

# ------------------------------------------------------------ 1. packages ---
PKGS=(munge slurmctld slurmd slurm-client)
[ "$ACCOUNTING" = 1 ] && PKGS+=(slurmdbd mariadb-server)
MISSING=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || MISSING+=("$p")
done
if [ ${#MISSING[@]} -gt 0 ]; then
  log "installing: ${MISSING[*]} (log: ${TMPDIR:-/tmp}/local-slurm-apt.log)"
  { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${MISSING[@]}"; } \
    > ${TMPDIR:-/tmp}/local-slurm-apt.log 2>&1 || { tail_log ${TMPDIR:-/tmp}/local-slurm-apt.log; die "apt-get install failed"; }
  log "packages installed ($(slurmctld -V))"
else
  log "packages already installed ($(slurmctld -V))"
fi

# --------------------------------------------------------------- 2. munge ---
install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
install -d -o munge -g munge -m 0711 /var/lib/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --keyfile=/etc/munge/munge.key || die "mungekey --create failed"
  log "created /etc/munge/munge.key"
fi
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
MUNGE_PID=$(ours munged munged)
if [ -n "$MUNGE_PID" ]; then
  log "munged already running (pid $MUNGE_PID, ours)"
elif munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "a munged not started by this script is already serving /run/munge; reusing it"
else
  runuser -u munge -- /usr/sbin/munged --force \
    || { tail_log /var/log/munge/munged.log; die "munged failed to start"; }
  record munged /run/munge/munged.pid munged
  log "started munged (pid $(cat $STATE/munged.pid))"
fi
wait_for "munge round-trip" sh -c 'munge -n | unmunge' \
  || { tail_log /var/log/munge/munged.log; die "munge -n | unmunge fails"; }

# ------------------------------------------------------------- 3. mariadb ---
if [ "$ACCOUNTING" = 1 ]; then
  install -d -o mysql -g root -m 0755 /run/mysqld
  if [ ! -d /var/lib/mysql/mysql ]; then
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql > ${TMPDIR:-/tmp}/local-slurm-mariadb-init.log 2>&1 \
      || { tail_log ${TMPDIR:-/tmp}/local-slurm-mariadb-init.log; die "mariadb-install-db failed"; }
  fi
  DB_PID=$(ours mariadbd mariadbd)
  if [ -n "$DB_PID" ]; then
    log "mariadbd already running (pid $DB_PID, ours)"
  elif mariadb-admin ping >/dev/null 2>&1; then
    log "a MariaDB not started by this script is already running; reusing it"
  else
    rm -f /run/mysqld/mysqld.pid
    setsid /usr/sbin/mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid \
      --socket=/run/mysqld/mysqld.sock --bind-address=127.0.0.1 \
      --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 \
      > "$LOG_DIR/mariadbd.log" 2>&1 < /dev/null &
    wait_for "mariadbd" sh -c 'mariadb-admin ping && test -s /run/mysqld/mysqld.pid' \
      || { tail_log "$LOG_DIR/mariadbd.log"; die "mariadbd did not come up in ${TIMEOUT}s"; }
    record mariadbd /run/mysqld/mysqld.pid mariadbd
    log "started mariadbd (pid $(cat $STATE/mariadbd.pid))"
  fi
  mariadb -u root -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
    ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;" \
    || die "could not create the 'slurm' MariaDB user (is root socket auth available?)"
fi

# -------------------------------------------------------------- 4. config ---
mkdir -p "$CONF_DIR" "$LOG_DIR" "$RUN_DIR" /var/spool/slurmctld /var/spool/slurmd
HW_MEM=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
[ -n "$HW_MEM" ] || die "'slurmd -C' did not report RealMemory"
MEM_MB=${SLURM_MEM_MB:-$(( HW_MEM * 95 / 100 ))}
if [ "$ACCOUNTING" = 1 ]; then
  ACCT_LINES="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819"
else
  ACCT_LINES="AccountingStorageType=accounting_storage/none"
fi
# write_conf FILE MODE: install stdin as FILE if it differs; echo "changed" if so
write_conf() {
  local tmp; tmp=$(mktemp)
  cat > "$tmp"
  if [ -f "$1" ] && cmp -s "$tmp" "$1"; then rm -f "$tmp"; else
    install -m "$2" -o root -g root "$tmp" "$1"; rm -f "$tmp"; echo changed; fi
}
SLURM_CHANGED=$(write_conf "$CONF_DIR/slurm.conf" 0644 <<EOF
# generated by start-local-slurm.sh
ClusterName=localcluster
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
$ACCT_LINES
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
KillWait=$KILL_WAIT
MailProg=/bin/true
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
)
# cgroups are not used by the plugins above; IgnoreSystemd keeps a cgroup/v2 host
# without systemd/dbus from failing slurmd's cgroup init.
CG_CHANGED=$(write_conf "$CONF_DIR/cgroup.conf" 0644 <<EOF
CgroupPlugin=autodetect
IgnoreSystemd=yes
EOF
)
DBD_CHANGED=
if [ "$ACCOUNTING" = 1 ]; then
  DBD_CHANGED=$(write_conf "$CONF_DIR/slurmdbd.conf" 0600 <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
DebugLevel=info
LogFile=$LOG_DIR/slurmdbd.log
PidFile=$RUN_DIR/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=$DB_PASS
EOF
)
fi
log "config: NodeName=$NODE CPUs=$CPUS RealMemory=$MEM_MB partition=$PARTITION accounting=$ACCOUNTING"
if [ -n "$SLURM_CHANGED$CG_CHANGED$DBD_CHANGED" ]; then
  stop_ours slurmd slurmd; stop_ours slurmctld slurmctld
  [ -n "$DBD_CHANGED" ] && stop_ours slurmdbd slurmdbd
fi

# ------------------------------------------------------- 5. slurm daemons ---
# start_slurm NAME PIDFILE LOGFILE READY-CMD... : start a self-daemonizing slurm daemon
start_slurm() {
  local name=$1 pidfile=$2 logfile=$3; shift 3
  local pid; pid=$(ours "$name" "$name")
  if [ -n "$pid" ]; then log "$name already running (pid $pid, ours)"; return; fi
  local other; other=$(foreign "$name" "")
  [ -z "$other" ] || die "$name already running as pid(s) $other, not started by this script; stop it first"
  rm -f "$pidfile"
  local extra=()
  [ "$name" = slurmd ] && [ "$NODE" != "$(hostname -s)" ] && extra=(-N "$NODE")
  "$name" "${extra[@]}" || { tail_log "$logfile"; die "$name exited with an error at startup"; }
  wait_for "$name pid file" test -s "$pidfile" || { tail_log "$logfile"; die "$name wrote no pid file"; }
  record "$name" "$pidfile" "$name"
  log "started $name (pid $(cat $STATE/$name.pid))"
  wait_for "$name" "$@" || { tail_log "$logfile"; die "$name did not become ready in ${TIMEOUT}s"; }
}

if [ "$ACCOUNTING" = 1 ]; then
  start_slurm slurmdbd "$RUN_DIR/slurmdbd.pid" "$LOG_DIR/slurmdbd.log" sacctmgr -n -P show cluster
fi
start_slurm slurmctld "$RUN_DIR/slurmctld.pid" "$LOG_DIR/slurmctld.log" scontrol ping
start_slurm slurmd "$RUN_DIR/slurmd.pid" "$LOG_DIR/slurmd.log" \
  sh -c "sinfo -h -n '$NODE' -o %t | grep -Eq '^(idle|mix|alloc|drain|down)'"

node_state() { sinfo -h -n "$NODE" -o %t | head -1; }
case "$(node_state)" in
  down*|drain*|drng*)
    log "node state is $(node_state), resuming it"
    scontrol update NodeName="$NODE" State=RESUME || true ;;
esac
wait_for "node $NODE idle" sh -c "sinfo -h -n '$NODE' -o %t | grep -Eq '^(idle|mix|alloc)$'" \
  || { scontrol show node "$NODE" >&2; tail_log "$LOG_DIR/slurmctld.log"; die "node $NODE is not usable"; }
if [ "$ACCOUNTING" = 1 ]; then
  wait_for "sacct" sacct -n -X -S now-1minutes \
    || { tail_log "$LOG_DIR/slurmdbd.log"; die "sacct does not work"; }
fi

# ---------------------------------------------------------- 6. smoke test ---
if [ "$SMOKE" = 1 ]; then
  out=$(cd /tmp && timeout "$TIMEOUT" srun -p "$PARTITION" -N1 -n1 -t 1 hostname 2>&1) \
    || { echo "$out" >&2; tail_log "$LOG_DIR/slurmd.log"; die "smoke test 'srun hostname' failed"; }
  log "smoke test: srun hostname -> $out"
  wait_for "node $NODE idle again" sh -c "sinfo -h -n '$NODE' -o %t | grep -Eq '^idle$'" || true
fi
sinfo
log "local SLURM cluster is up (pids recorded in $STATE)"
