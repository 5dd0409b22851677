#!/bin/bash
# One training run on several machines with torchrun (no scheduler): run this same script on every
# machine; the agents meet at the c10d rendezvous on RDZV_HOST:RDZV_PORT and give each process its
# ranks (RANK, LOCAL_RANK, GROUP_RANK, WORLD_SIZE), which Lightning's TorchElasticEnvironment reads.
#
#   NNODES=2 GPUS_PER_NODE=8 RDZV_HOST=node0.cluster RDZV_PORT=29400 bash docs/recipes/torchrun.sh
#   CONFIG=configs/oracle_grpo.yaml RUN_NAME=oracle_2x8 NNODES=2 GPUS_PER_NODE=8 RDZV_HOST=... bash docs/recipes/torchrun.sh
#
# The repository (with its .venv) and the run folder must be on a filesystem every machine sees
# (docs/cluster.md). Running the script again on every machine continues the run (--ckpt_path last).
# tests/test_multinode_cpu.py runs this script as two "machines" on one CPU host (ACCELERATOR=cpu).
set -euo pipefail
cd "$(dirname "$0")/../.."
source .venv/bin/activate
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}  # download the model once beforehand
: "${NNODES:?set NNODES}" "${GPUS_PER_NODE:?set GPUS_PER_NODE}"
: "${RDZV_HOST:?set RDZV_HOST: the address of one machine, the same on every machine}" "${RDZV_PORT:=29400}"

# >>> cli arguments (tests/test_multinode_cpu.py runs this block and checks the fields with cli.py fit --print_config)
CONFIG=${CONFIG:-configs/steering_rl.yaml}
RUN_NAME=${RUN_NAME:-steering_multinode}
CLI_ARGS=(fit --config "$CONFIG" --run_name "$RUN_NAME"
          --trainer.num_nodes "$NNODES" --trainer.devices "$GPUS_PER_NODE"
          --trainer.accelerator "${ACCELERATOR:-gpu}" --trainer.strategy ddp
          --ckpt_path last)
# <<< cli arguments

exec torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$RDZV_HOST:$RDZV_PORT" --rdzv-id "${RDZV_ID:-$RUN_NAME}" \
    cli.py "${CLI_ARGS[@]}"
