#!/usr/bin/env bash
# One rank, started by srun once per task: torch.distributed's variables from Slurm's, then Python.
#   srun slurm/launch_rank.sh pretrain/main.py ARGS...     (inside sbatch or salloc)
# pretrain/distributed.py keeps RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* when they are set, and
# DeepSpeed's init_distributed reads them (env://), so no other launcher is involved.
set -euo pipefail
export RANK="$SLURM_PROCID" WORLD_SIZE="$SLURM_NTASKS" LOCAL_RANK="$SLURM_LOCALID"
# `scontrol show hostnames` expands the node list locally (no call to the controller): rank 0's node.
mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
export MASTER_ADDR="${hosts[0]}"
# Same on every task and across requeues (same job id), different for concurrent jobs; override if a
# node's other jobs collide (job ids 15000 apart).
export MASTER_PORT="${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 15000))}"
if [ "$RANK" = 0 ]; then
  echo "rank 0 of $WORLD_SIZE on $(hostname): rendezvous at $MASTER_ADDR:$MASTER_PORT" >&2
fi
# exec: Slurm signals every process of the step, and only Python handles USR1/TERM (a bash parent
# would die of them).
exec python "$@"
