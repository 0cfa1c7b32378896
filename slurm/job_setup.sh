# Common start of slurm/train.sbatch and slurm/eval.sbatch (sourced in the batch shell).
# Slurm runs a copy of the batch script from its spool directory: the repository is where sbatch
# was called, so submit from the repository root.
: "${SLURM_JOB_ID:?not in a Slurm job: submit with sbatch}"
cd "$SLURM_SUBMIT_DIR"
source scripts/setup.sh   # the .venv on PATH, TORCH_EXTENSIONS_DIR, W&B offline without an API key
set -euo pipefail         # after setup.sh, which turns -e off at its end

# The CPU switch is the GPU count: a job with --gpus-per-node=0 (or none) runs CPU ranks, and torch
# and DeepSpeed then choose the CPU accelerator and gloo. Any GPU of the node is hidden so they
# cannot pick it up; with GPUs, one rank per GPU (LOCAL_RANK selects it) and NCCL.
if [ "${SLURM_GPUS_ON_NODE:-0}" -eq 0 ]; then
  export CUDA_VISIBLE_DEVICES=
  DEVICES="CPU ranks (gloo)"
else
  tasks_per_node=$((SLURM_NTASKS / SLURM_JOB_NUM_NODES))
  if [ "$tasks_per_node" -ne "$SLURM_GPUS_ON_NODE" ]; then
    echo "error: $tasks_per_node tasks but $SLURM_GPUS_ON_NODE GPUs per node; set --ntasks-per-node to the GPU count (one rank per GPU)" >&2
    exit 2
  fi
  DEVICES="$SLURM_GPUS_ON_NODE GPUs per node (NCCL)"
fi
# Threads per rank: the cores Slurm gave the task, so ranks sharing a node do not oversubscribe it.
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"
# srun does not inherit sbatch's --cpus-per-task (Slurm 22.05 to 23.02): without this, a site that
# binds tasks to cores would give each rank one core.
export SRUN_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK:-1}"
source slurm/nccl.sh
echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: $SLURM_NTASKS tasks, $DEVICES, $(date -Is)"
