#!/usr/bin/env bash
# Start a throw-away one-node SLURM cluster on localhost: munged + slurmctld + slurmd, all state under
# $LOCAL_SLURM_DIR (default /tmp/longcat-slurm). Run as root (slurmd switches to the job's user).
# Idempotent: exits 0 at once when the cluster is already up. Afterwards: source $LOCAL_SLURM_DIR/env.sh
#
#   LOCAL_SLURM_DIR   state/config/log directory            (default /tmp/longcat-slurm)
#   SLURM_FAKE_CPUS   CPUs the node advertises (may exceed nproc; default max(nproc, 8))
#   SLURM_FAKE_GPUS   GPUs the node advertises (no devices, counting only) so that scripts with
#                     --gpus-per-node run unchanged (default 8)
#   SLURMCTLD_PORT / SLURMD_PORT                            (default 6817 / 6818)
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "start.sh: run as root (slurmd must switch to the job user)" >&2; exit 1; }
BASE=${LOCAL_SLURM_DIR:-/tmp/longcat-slurm}
NODE=$(hostname -s)
NPROC=$(nproc)
CPUS=${SLURM_FAKE_CPUS:-$(( NPROC > 8 ? NPROC : 8 ))}
GPUS=${SLURM_FAKE_GPUS:-8}
MEM=$(( $(free -m | awk '/^Mem:/{print $2}') - 1024 ))
CTLD_PORT=${SLURMCTLD_PORT:-6817}; SLURMD_PORT=${SLURMD_PORT:-6818}
# A zombie keeps its pid (PID 1 in containers may never reap), so "alive" means: exists and state != Z.
alive() { local p; p=$(cat "$1" 2>/dev/null) && [ -n "$p" ] && ps -o stat= -p "$p" 2>/dev/null | grep -qv Z; }
if alive "$BASE/run/slurmctld.pid" && alive "$BASE/run/slurmd.pid"; then
  echo "local SLURM already running (source $BASE/env.sh)"; exit 0
fi
mkdir -p "$BASE"/{etc,munge,state,spool,log,run}
chmod 0755 "$BASE" "$BASE/munge"   # job users must reach the munge socket

# munge with a private key and socket (nothing under /etc or /run is used)
KEY=$BASE/munge/munge.key; SOCK=$BASE/munge/munge.socket.2
[ -s "$KEY" ] || { dd if=/dev/urandom of="$KEY" bs=1024 count=1 status=none; chmod 0400 "$KEY"; }
if ! alive "$BASE/munge/munged.pid"; then
  /usr/sbin/munged --force --key-file="$KEY" --socket="$SOCK" --pid-file="$BASE/munge/munged.pid" \
    --log-file="$BASE/log/munged.log" --seed-file="$BASE/munge/munged.seed"
fi
for _ in $(seq 50); do munge -S "$SOCK" -n </dev/null | unmunge -S "$SOCK" >/dev/null 2>&1 && break; sleep 0.1; done

# Fake GPUs: slurmd wants one character device per GPU; nodes like /dev/null's (1,3) will do.
GRES_NODE=""; GRES_TYPES=""
if [ "$GPUS" -gt 0 ]; then
  mkdir -p "$BASE/dev"
  for i in $(seq 0 $(( GPUS - 1 ))); do
    [ -c "$BASE/dev/gpu$i" ] || { rm -f "$BASE/dev/gpu$i"; mknod "$BASE/dev/gpu$i" c 1 3; }
  done
  echo "NodeName=${NODE} Name=gpu File=${BASE}/dev/gpu[0-$(( GPUS - 1 ))]" > "$BASE/etc/gres.conf"
  GRES_NODE="Gres=gpu:${GPUS}"; GRES_TYPES="GresTypes=gpu"
else
  : > "$BASE/etc/gres.conf"
fi
cat > "$BASE/etc/slurm.conf" <<CONF
ClusterName=longcat-test
SlurmctldHost=${NODE}(127.0.0.1)
SlurmctldPort=${CTLD_PORT}
SlurmdPort=${SLURMD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=5 (minimum accepted): a requeued job may start 5 s after requeue instead of 120 s
AuthInfo=socket=${SOCK},cred_expire=5
StateSaveLocation=${BASE}/state
SlurmdSpoolDir=${BASE}/spool
SlurmctldPidFile=${BASE}/run/slurmctld.pid
SlurmdPidFile=${BASE}/run/slurmd.pid
SlurmctldLogFile=${BASE}/log/slurmctld.log
SlurmdLogFile=${BASE}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=${BASE}/log/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# start pending/requeued jobs within ~2 s (the default main scheduling loop runs every 60 s)
SchedulerParameters=bf_interval=1,sched_interval=2
MpiDefault=none
ReturnToService=2
# trust CPUs/Gres below even when they exceed the hardware
SlurmdParameters=config_overrides
${GRES_TYPES}
JobRequeue=1
MailProg=/bin/true
MinJobAge=600
KillWait=10
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${CPUS} ${GRES_NODE} RealMemory=${MEM} State=UNKNOWN
PartitionName=debug Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
export SLURM_CONF=$BASE/etc/slurm.conf
echo "export SLURM_CONF=$SLURM_CONF" > "$BASE/env.sh"

/usr/sbin/slurmctld -f "$SLURM_CONF" -c    # -c: fresh state every start
/usr/sbin/slurmd -f "$SLURM_CONF" -N "$NODE"
st=
for _ in $(seq 150); do
  st=$(sinfo -h -n "$NODE" -o '%t' 2>/dev/null || true)
  [ "$st" = idle ] && break
  sleep 0.2
done
if [ "$st" != idle ]; then
  echo "start.sh: node not idle (state '$st'); logs in $BASE/log" >&2; sinfo -R >&2 || true; exit 1
fi
echo "local SLURM up: node $NODE idle, $CPUS CPUs, $GPUS (fake) GPUs; source $BASE/env.sh"
