#!/usr/bin/env bash
# Serve BUFFER, answering every message with itself (an echo bot on the hook).
#   scripts/echo_server.sh BUFFER [more server options]
set -euo pipefail

pyz="$(cd "$(dirname "$0")/.." && pwd)/filechat.pyz"
buffer=${1:?usage: echo_server.sh BUFFER [OPTIONS]}
shift
exec python3 "$pyz" server "$buffer" --auto-reply-cmd cat "$@"
