#!/usr/bin/env bash
# Join this machine to a running Ray cluster as a worker node.
#
#   launch/start_worker.sh HEAD_IP:6379              # address printed by launch/start_head.sh
#   launch/start_worker.sh HEAD_IP:6379 --num-gpus 4 # extra flags go to `ray start`
#
# The model must be readable at the same path on every node that hosts a rank (shared
# filesystem or a copy), and distgen installed in the same Python environment.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 HEAD_IP:PORT [ray start flags...]" >&2
  exit 2
fi
HEAD="$1"
shift
NODE_IP="${RAY_NODE_IP:-$(hostname -I | awk '{print $1}')}"

ray start \
  --address="$HEAD" \
  --node-ip-address="$NODE_IP" \
  --disable-usage-stats \
  "$@"
