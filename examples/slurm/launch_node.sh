#!/usr/bin/env bash
# One node's share of a SLURM job: derives the node's rank, the node count, the processes per node and the main
# address and port from SLURM's environment, then runs `accelerate launch` with them. Arguments go to the trainer.
#   NANOGPT_CPU=1   CPU processes over gloo instead of GPUs (how the test runs it on one machine)
#   NANOGPT_PROCS_PER_NODE=N   processes per node (default: SLURM_GPUS_ON_NODE, else the GPUs nvidia-smi lists)
set -euo pipefail
nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:?run under SLURM (srun/sbatch): SLURM_JOB_NUM_NODES is not set}}
node_rank=${SLURM_NODEID:?run under SLURM (srun/sbatch): SLURM_NODEID is not set}
main_addr=$(scontrol show hostnames "${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST is not set}" | head -n 1)
main_port=$((20000 + ${SLURM_JOB_ID:-0} % 10000))  # per job, so two jobs sharing a node do not collide
if [[ -n "${NANOGPT_PROCS_PER_NODE:-}" ]]; then
  per_node=$NANOGPT_PROCS_PER_NODE
elif [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
  per_node=$SLURM_GPUS_ON_NODE
else
  per_node=$(nvidia-smi -L 2>/dev/null | wc -l)
fi
if [[ "${NANOGPT_CPU:-0}" == 1 ]]; then
  export ACCELERATE_USE_CPU=1
  extra=(--device=cpu)
else
  extra=()
  (( per_node > 0 )) || { echo "error: no GPU on $(hostname); set NANOGPT_PROCS_PER_NODE, or NANOGPT_CPU=1" >&2; exit 2; }
fi
# A stop signal (train.sbatch's --signal=TERM@120, scancel --signal=TERM, preemption): torch's elastic agent passes it
# to the workers, which finish their step and checkpoint it; their writer is detached, but this task ending makes
# slurmstepd kill everything left in the step, the writer included. So the agent waits for its workers up to 100 s
# instead of its default 30 (the workers wait for their writer), within the 120 s SLURM gives before the kill.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-100}
echo "node $node_rank of $nodes: $per_node processes, main $main_addr:$main_port"
# --mixed_precision no: precision is the trainer's dtype key (bf16 where the GPU has it), not the launcher's
exec python3 -m accelerate.commands.launch --multi_gpu --num_machines "$nodes" --machine_rank "$node_rank" \
  --num_processes $((nodes * per_node)) --main_process_ip "$main_addr" --main_process_port "$main_port" \
  --rdzv_backend static --same_network --mixed_precision no --dynamo_backend no \
  train_accelerate.py --init_from=auto "${extra[@]}" "$@"
