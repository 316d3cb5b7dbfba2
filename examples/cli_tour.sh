#!/usr/bin/env bash
# A tour of the `specthink` command: ask a question, keep its trace, render the trace as HTML.
#
# With SPECTHINK_SMALL_URL and SPECTHINK_TARGET_URL set, it uses those servers; otherwise
# `specthink ask` starts the local CPU pair (SmolLM2-135M-Instruct in both roles, which only
# demonstrates the mechanics) and leaves it running: stop it with `specthink local down`.
set -euo pipefail
out="${1:-specthink-tour}"
mkdir -p "$out"

if [[ -n "${SPECTHINK_SMALL_URL:-}" && -n "${SPECTHINK_TARGET_URL:-}" ]]; then
    specthink servers check
fi

# The live view: each segment coloured by the model that wrote it, ⟨rule⟩ at each takeover,
# then the statistics table on stderr.
specthink ask "Explain step by step: what is 17 * 24?" --max-tokens 256 \
    --save-trace "$out/trace.json"

# The same trace as a self-contained page, and the statistics for scripts.
specthink trace "$out/trace.json" --html "$out/trace.html"
python3 -c 'import json, sys; s = json.load(open(sys.argv[1]))["stats"]
print("target share %.1f%%, takeovers %s" % (100 * s["target_share"], s["takeovers"]))' \
    "$out/trace.json"
