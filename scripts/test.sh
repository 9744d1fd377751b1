#!/usr/bin/env bash
# Install everything the tests need (CPU torch, the package, a headless Chromium for the
# browser test) and run the suite. The README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[test]"
if ! command -v chromium >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: the browser test will be skipped"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# one worker per core, a test file per worker (module fixtures are built once)
python3 -m pytest -q -n "$(python3 -c 'import os; print(min(os.cpu_count() or 1, 4))')" --dist loadfile "$@"
