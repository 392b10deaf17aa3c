#!/usr/bin/env bash
# A real one-node SLURM cluster on localhost, for developers and CI (the SLURM tests run against it).
#
#   bash launch/slurm_local.sh start     # writes DIR/slurm.conf, starts munged, slurmctld, slurmd
#   export SLURM_CONF=DIR/slurm.conf     # printed by `start`; every SLURM command reads it
#   bash launch/slurm_local.sh stop      # stops the three daemons by the PIDs recorded at start
#   bash launch/slurm_local.sh status
#
# DIR is $VLA_SCALE_SLURM_DIR (default /tmp/vla-scale-slurm). Nothing is written outside it: the
# configuration, munge key and socket, state, spool, PID files and daemon logs all live there, so a
# machine's own /etc/slurm is never touched. Needs root (slurmd starts jobs as their owner) and
# Debian's `slurmctld slurmd slurm-client munge` packages (`start` says so when they are missing).
#
# Choices, each measured on the CPU machine (see MACHINE.md):
# - CPUs and memory are read from the machine: a node that claims more than it has is marked invalid.
# - proctrack/linuxproc and task/none: the cgroup plugins drain the node inside a container.
# - cons_tres with CR_Core: memory is not a consumable, so a job without --mem does not take the node.
# - AuthInfo cred_expire=10: a requeued job waits cred_expire seconds before it may start again
#   (120 by default); 10 keeps the preemption tests short. Production clusters keep their own value.
# - KillWait=5: a job's processes get SIGTERM, then SIGKILL 5 s later (30 by default).
set -euo pipefail

DIR=${VLA_SCALE_SLURM_DIR:-/tmp/vla-scale-slurm}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

need() {
  local missing=()
  for tool in munged mungekey slurmctld slurmd sbatch scontrol; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
  done
  if ((${#missing[@]})); then
    echo "slurm_local.sh: missing ${missing[*]}; install them with:" >&2
    echo "  apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge" >&2
    exit 1
  fi
  if [[ $(id -u) != 0 ]]; then
    echo "slurm_local.sh: run as root (slurmd must be able to start jobs as their owner)" >&2
    exit 1
  fi
}

write_conf() {
  local cpus mem_mb
  cpus=$(nproc)
  # RealMemory must not exceed what slurmd measures; leave 2 GB for the daemons and the system.
  mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 - 2048}' /proc/meminfo)
  cat >"$CONF" <<EOF
# Written by launch/slurm_local.sh: a one-node cluster on localhost.
ClusterName=vlascale-local
SlurmctldHost=localhost
SlurmUser=root
SlurmctldPort=${VLA_SCALE_SLURMCTLD_PORT:-6817}
SlurmdPort=${VLA_SCALE_SLURMD_PORT:-6818}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge-run/munge.socket,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=300
KillWait=5
MailProg=/bin/true
ReturnToService=2
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

wait_for_cluster() {
  # The node registers a moment after slurmd starts; jobs submitted before then stay pending.
  for _ in $(seq 1 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
      return 0
    fi
    sleep 0.5
  done
  echo "slurm_local.sh: the node did not become idle; see $DIR/log/" >&2
  sinfo -N -l >&2 || true
  return 1
}

start() {
  need
  if [[ -f $DIR/pids ]]; then
    echo "slurm_local.sh: a cluster from $DIR seems to be running (stop it first)" >&2
    exit 1
  fi
  # The key stays private to munge; the socket's folder must be open to every job's user.
  mkdir -p "$DIR"/{munge,munge-run,state,spool,log}
  chmod 755 "$DIR"  # munged (user munge) must reach its folders, also when DIR came from `mktemp -d`
  chown munge:munge "$DIR/munge" "$DIR/munge-run"
  chmod 700 "$DIR/munge"
  chmod 755 "$DIR/munge-run"
  [[ -f $DIR/munge/munge.key ]] || mungekey --create --keyfile="$DIR/munge/munge.key" >/dev/null
  chown munge:munge "$DIR/munge/munge.key"
  chmod 400 "$DIR/munge/munge.key"
  write_conf
  : >"$DIR/pids"
  # munged refuses to run as root; its key, log and seed stay in $DIR/munge, socket and PID file in $DIR/munge-run.
  su -s /bin/sh munge -c "exec munged -F --key-file=$DIR/munge/munge.key --socket=$DIR/munge-run/munge.socket \
      --pid-file=$DIR/munge-run/munged.pid --log-file=$DIR/munge/munged.log --seed-file=$DIR/munge/munged.seed" \
      >>"$DIR/log/munged.out" 2>&1 &
  echo "munged $!" >>"$DIR/pids"
  for _ in $(seq 1 40); do [[ -S $DIR/munge-run/munge.socket ]] && break; sleep 0.25; done
  slurmctld -D -i -f "$CONF" >>"$DIR/log/slurmctld.out" 2>&1 &
  echo "slurmctld $!" >>"$DIR/pids"
  slurmd -D -N localhost -f "$CONF" >>"$DIR/log/slurmd.out" 2>&1 &
  echo "slurmd $!" >>"$DIR/pids"
  wait_for_cluster
  echo "slurm_local.sh: cluster up ($(nproc) CPUs); run: export SLURM_CONF=$CONF"
}

stop() {
  [[ -f $DIR/pids ]] || { echo "slurm_local.sh: no cluster recorded in $DIR"; return 0; }
  # Reverse order: slurmd, slurmctld, munged. `su` may have exec'd munged under another PID: its own
  # PID file names it.
  local name pid
  while read -r name pid; do
    kill "$pid" 2>/dev/null || true
  done < <(tac "$DIR/pids")
  [[ -f $DIR/munge-run/munged.pid ]] && kill "$(cat "$DIR/munge-run/munged.pid")" 2>/dev/null || true
  while read -r name pid; do
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
  done <"$DIR/pids"
  rm -f "$DIR/pids"
  echo "slurm_local.sh: stopped"
}

status() {
  [[ -f $DIR/pids ]] || { echo "not running"; return 1; }
  sinfo -N -l
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
