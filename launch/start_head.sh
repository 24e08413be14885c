#!/usr/bin/env bash
# Start the head node of a Ray cluster for distgen on this machine.
#
#   launch/start_head.sh                 # GPUs and CPUs detected by Ray
#   RAY_PORT=6380 launch/start_head.sh   # the GCS port (default: Ray's own, 6379)
#   RAY_DASHBOARD_PORT=8266 launch/start_head.sh  # the dashboard / job server port (default 8265)
#   launch/start_head.sh --num-gpus 0    # extra flags go to `ray start`
#
# Prints the address worker nodes join with (launch/start_worker.sh HEAD_IP:PORT) and that
# `ray job submit` uses (http://HEAD_IP:8265, the dashboard's job server).
set -euo pipefail

PORT_FLAG=()
[[ -n "${RAY_PORT:-}" ]] && PORT_FLAG=(--port="$RAY_PORT")
DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
HEAD_IP="${RAY_HEAD_IP:-$(hostname -I | awk '{print $1}')}"

ray start --head \
  --node-ip-address="$HEAD_IP" \
  "${PORT_FLAG[@]}" \
  --dashboard-host=0.0.0.0 \
  --dashboard-port="$DASHBOARD_PORT" \
  --disable-usage-stats \
  "$@"

echo
PORT="${RAY_PORT:-6379}"
echo "Ray head is up at $HEAD_IP:$PORT"
echo "  join a worker node:  launch/start_worker.sh $HEAD_IP:$PORT"
echo "  submit the server:   RAY_ADDRESS=http://$HEAD_IP:$DASHBOARD_PORT launch/submit_serve.sh MODEL --tp N"
