#!/usr/bin/env bash
# Build filechat.pyz, start a server with an auto-reply, send a few messages,
# print the conversation, stop the server and leave no file behind.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}      # another interpreter to run it with, e.g. PYTHON=python3.8
"$python" "$here/build_zipapp.py" >/dev/null
pyz="$here/filechat.pyz"

work=$(mktemp -d "${TMPDIR:-/tmp}/filechat-demo.XXXXXX")
server_pid=
cleanup() {
    # SIGTERM stops a server like Ctrl+C, and a background job cannot ignore it.
    if [ -n "$server_pid" ]; then kill -TERM "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
cd "$work"

# The server answers each message with a line built from it, through the hook.
"$python" "$pyz" server buf.txt --max-messages 3 \
    --auto-reply-cmd 'printf "Got your %s-byte message, thanks!\n" "$(wc -c | tr -d " ")"' \
    > server.log 2>&1 &
server_pid=$!

for message in "Hello server!" "How are you today?" "Bye."; do
    reply=$("$python" "$pyz" client buf.txt --message "$message" 2>/dev/null)
    printf 'client: %s\nserver: %s\n' "$message" "$reply"
done

wait "$server_pid"      # --max-messages 3: it stops by itself
server_pid=
echo
echo "--- what the server showed ---"
cat server.log
