#!/usr/bin/env bash
# The test command: set up the environment if needed, then run the whole CPU test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/scheduler_proc -x).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup_env.sh"
cd "$root"
. .venv/bin/activate
python -m frontend.default_model >/dev/null  # convert the bundled model once (cached)
exec python -m pytest -q "$@"
