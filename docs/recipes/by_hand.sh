#!/bin/bash
# One training run on several machines started by hand (no scheduler, no torchrun): run this script
# on every machine with its own NODE_RANK (0 on the machine at MASTER_ADDR). Lightning's
# LightningEnvironment reads NODE_RANK, MASTER_ADDR and MASTER_PORT and starts the GPUS_PER_NODE
# processes of its machine itself.
#
#   NODE_RANK=0 NNODES=2 GPUS_PER_NODE=8 MASTER_ADDR=node0.cluster MASTER_PORT=29500 bash docs/recipes/by_hand.sh   # on node0
#   NODE_RANK=1 NNODES=2 GPUS_PER_NODE=8 MASTER_ADDR=node0.cluster MASTER_PORT=29500 bash docs/recipes/by_hand.sh   # on node1
#
# Leave LOCAL_RANK unset: with it set, Lightning takes every process for started by hand, one per
# GPU. tests/test_multinode_cpu.py runs this script as two "machines" on one CPU host (ACCELERATOR=cpu).
set -euo pipefail
cd "$(dirname "$0")/../.."
source .venv/bin/activate
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
: "${NODE_RANK:?set NODE_RANK: 0 on the MASTER_ADDR machine, 1..NNODES-1 on the others}"
: "${MASTER_ADDR:?set MASTER_ADDR: the address of node 0}" "${MASTER_PORT:?set MASTER_PORT: a free port on node 0}"
: "${NNODES:?set NNODES}" "${GPUS_PER_NODE:?set GPUS_PER_NODE}"
export NODE_RANK MASTER_ADDR MASTER_PORT

# >>> cli arguments (tests/test_multinode_cpu.py runs this block and checks the fields with cli.py fit --print_config)
CONFIG=${CONFIG:-configs/steering_rl.yaml}
RUN_NAME=${RUN_NAME:-steering_multinode}
CLI_ARGS=(fit --config "$CONFIG" --run_name "$RUN_NAME"
          --trainer.num_nodes "$NNODES" --trainer.devices "$GPUS_PER_NODE"
          --trainer.accelerator "${ACCELERATOR:-gpu}" --trainer.strategy ddp
          --ckpt_path last)
# <<< cli arguments

exec python cli.py "${CLI_ARGS[@]}"
