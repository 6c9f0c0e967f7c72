#!/usr/bin/env bash
# The serve command: set up the project's environment if needed, then run the OpenAI-compatible
# server in this process (exec), so signals reach it directly and its exit code is ours.
#   scripts/launch.sh [--model DIR] [--port 8000] ...    (scripts/launch.sh --help lists every flag)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup_env.sh"
# No cd: relative paths (--model ./dir, --chat-template ./t.jinja) stay relative to the caller's directory.
exec "$root/.venv/bin/python" -m frontend.api_server "$@"
