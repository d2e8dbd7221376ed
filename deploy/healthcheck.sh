#!/bin/sh
# Liveness/readiness probe for a stylequeue worker container: every Celery node named in
# HEALTHCHECK_NODES (default "gpu0"), on this host, must answer a broadcast ping.
#
# The workers use the prefork pool, so the main process answers pings even while a child runs a
# minutes-long job; a failed ping means the worker is hung or disconnected, not merely busy.
# Node names follow `stylequeue worker`: gpu<i>@host per GPU, cpu0@host without one, light@host.
set -eu
host="$(hostname)"
nodes=""
for node in ${HEALTHCHECK_NODES:-gpu0}; do
  nodes="${nodes:+$nodes,}${node}@${host}"
done
replies="$(celery -A stylequeue.tasks.app inspect ping --timeout "${HEALTHCHECK_TIMEOUT:-10}" \
  --destination "$nodes" --json 2>/dev/null || true)"
for node in $(echo "$nodes" | tr ',' ' '); do
  case "$replies" in
    *"\"$node\""*) ;;
    *) echo "no ping reply from $node" >&2; exit 1 ;;
  esac
done
echo "ok: $nodes"
