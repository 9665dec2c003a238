#!/usr/bin/env bash
# Ask a server one question from a script and branch on the reply and the exit status.
#   scripts/ask.sh BUFFER "Deploy now?"
set -uo pipefail

pyz="$(cd "$(dirname "$0")/.." && pwd)/filechat.pyz"
buffer=${1:?usage: ask.sh BUFFER QUESTION}
question=${2:?usage: ask.sh BUFFER QUESTION}

# --quiet: no status lines, but filechat's own error, if any, still reaches stderr.
reply=$(python3 "$pyz" client "$buffer" --message "$question" --timeout 30 --quiet)
status=$?
case $status in
    0) ;;
    3) echo "nobody answered within 30 s"; exit 3 ;;
    *) echo "filechat failed with exit status $status"; exit "$status" ;;
esac
case $reply in
    [Yy]*) echo "answer was yes: going ahead" ;;
    *)     echo "answer was '$reply': stopping" ;;
esac
