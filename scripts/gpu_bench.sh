#!/usr/bin/env bash
# Issue 16's GPU rows (SD 1.5-architecture UNet, 64×64 latents, fp16) in one call of a lent
# GPU machine. That machine has torch, transformers and accelerate but no diffusers, and cannot
# download: diffusers and PEFT (the versions tested here) travel as wheels in .whl/ (ignored by
# git). transformers stays the machine's own (5.17 in 2026-11): the one tested here wants a
# newer regex than it may have.
#
#   here, once:   bash scripts/gpu_bench.sh wheels
#   there:        bash scripts/gpu_bench.sh          (the device tool: carry [".whl"], timeout_s 560)
#
# It runs the cost suite eager first (its JSON, table and plot land in $OUT/eager), then, in
# the time left, again with torch.compile rows and without the many-subjects runs the first
# pass measured ($OUT/compiled): whatever finished comes back.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = wheels ]; then
  exclude="$(git rev-parse --git-common-dir)/info/exclude"  # (.git is a file in a worktree)
  grep -qx '/.whl/' "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"
  # for the device's Python 3.12 (diffusers imports importlib.metadata from the standard library there)
  pins=$(python3 -c 'import importlib.metadata as m; print(" ".join(f"{p}=={m.version(p)}" for p in ("diffusers", "peft")))')
  exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl $pins
fi
out=${OUT:-gpu_results}
mkdir -p "$out/eager" "$out/compiled"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv  # to the output: at most 8 files come back, the suites write 4 each
start=$SECONDS
timeout 300 python3 -m loldu_diffusion.bench cost --device cuda --compile none --json --out "$out/eager" 2>&1 | tail -c 20000 > "$out/eager/log.txt"
echo "eager suite: rc ${PIPESTATUS[0]} in $((SECONDS - start)) s"
left=$((520 - SECONDS))
if [ "$left" -gt 60 ]; then
  timeout "$left" python3 -m loldu_diffusion.bench cost --device cuda --compile inductor --no_subjects --json --out "$out/compiled" 2>&1 | tail -c 20000 > "$out/compiled/log.txt"
  echo "compiled suite: rc ${PIPESTATUS[0]} in $((SECONDS - start)) s"
fi
tail -n 60 "$out/eager/cost.md" 2>/dev/null
