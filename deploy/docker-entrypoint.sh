#!/bin/sh
# Start of a loramux container: build the demo adapters if asked and the registry (perhaps mounted at
# /data) has none, then serve. Flags given to `docker run IMAGE ...` go to `loramux serve`.
set -eu
if [ "${LORAMUX_DEMO_IF_MISSING:-false}" = "true" ]; then
    loramux demo --if-missing
fi
exec loramux serve "$@"
