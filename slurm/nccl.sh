# Network and collective settings of Slurm jobs: the one place to adapt them to a cluster.
# Sourced by slurm/job_setup.sh, so every rank of slurm/train.sbatch and slurm/eval.sbatch sees them.
# A value set in the environment at sbatch time wins over the ones set here. Commented lines show
# the setting with the library's default behaviour described above it: uncomment to change it.

# --- Interface selection -------------------------------------------------------------------------
# NCCL's bootstrap and socket traffic. Default: interfaces named ib* first, then any other, never lo
# or docker* unless nothing else exists. Prefix list; "^" excludes, "=" matches a whole name.
# export NCCL_SOCKET_IFNAME=ib0            # or =eth0, or ^docker,lo
# gloo's interface (CPU ranks, and torch's CPU-side collectives). Default: the one the hostname resolves to.
# export GLOO_SOCKET_IFNAME=eth0

# --- InfiniBand / RoCE -----------------------------------------------------------------------------
# Default: NCCL uses every InfiniBand/RoCE adapter it finds, and sockets otherwise.
# export NCCL_IB_DISABLE=1                 # sockets only: to rule out the fabric when a job hangs
# export NCCL_IB_HCA=mlx5_0,mlx5_1         # only these adapters (default: all)

# --- Debug level -----------------------------------------------------------------------------------
# NCCL prints nothing when NCCL_DEBUG is unset; WARN logs each failure with its cause. INFO adds the
# chosen interfaces, transports and rings at start (what to look at when a job hangs or is slow).
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# export NCCL_DEBUG_SUBSYS=INIT,NET        # with NCCL_DEBUG=INFO: only start-up and network lines

# --- Timeouts --------------------------------------------------------------------------------------
# The collective and heartbeat bounds are pretrain/main.py's flags (--distributed_timeout_minutes,
# default 60, on every group DeepSpeed makes too; --heartbeat_timeout_s, default 300), so pass them with
# the job's arguments; DEEPSPEED_TIMEOUT is not read. On NCCL a collective past the bound aborts the rank
# (torch's TORCH_NCCL_ASYNC_ERROR_HANDLING default, 3), so a lost node ends the job instead of hanging it.
# InfiniBand transport timeout, 4.096 us x 2^N (default 20 in recent NCCL, 18 in older), and retries (default 7).
# export NCCL_IB_TIMEOUT=22
# export NCCL_IB_RETRY_CNT=7
