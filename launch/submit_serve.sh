#!/usr/bin/env bash
# Submit `distgen serve` to a Ray cluster as a Ray job: the engine core runs in the job's driver
# and places one actor per rank (one GPU each) in a placement group: tp ranks per pipeline stage.
#
#   RAY_ADDRESS=http://HEAD_IP:8265 launch/submit_serve.sh /models/Qwen2-7B --tp 4
#   RAY_ADDRESS=http://HEAD_IP:8265 launch/submit_serve.sh /models/Llama-3-70B --tp 8 --pp 2   # two nodes
#   RAY_ADDRESS=http://HEAD_IP:8265 launch/submit_serve.sh /models/m --tp 2 --port 8001 --max-model-len 4096
#   RAY_ADDRESS=http://HEAD_IP:8265 launch/submit_serve.sh /models/m --tp 2 -dp 4    # 4 replicas of 2 ranks
#
# Arguments after the model and --tp go to `distgen serve` unchanged (vLLM's flag names). The job
# uploads this directory (--working-dir .), so run it from the distgen checkout; the model path is read
# on the cluster's nodes. `ray job logs -f JOB_ID` follows it, `ray job stop JOB_ID` ends it (and its
# actors). Needs `pip install 'ray[default]'` (the jobs CLI) and, with token authentication, the
# cluster's token (~/.ray/auth_token or RAY_AUTH_TOKEN).
set -euo pipefail

if [[ $# -lt 3 || "$2" != "--tp" ]]; then
  echo "usage: $0 MODEL --tp N [distgen serve flags...]" >&2
  exit 2
fi
MODEL="$1"
TP="$3"
shift 3

exec ray job submit --working-dir . -- \
  distgen serve "$MODEL" \
  --tp "$TP" \
  --distributed-executor-backend ray \
  --host 0.0.0.0 \
  "$@"
