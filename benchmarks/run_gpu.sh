#!/usr/bin/env bash
# The GPU benchmarks of docs/performance.md, most wanted first, within a time budget; one log and the JSON rows
# under OUT (default benchmarks/out):
#   bash benchmarks/run_gpu.sh [OUT]                  steps in order until BUDGET seconds (default 540) are spent
#   STEPS="4 6" bash benchmarks/run_gpu.sh OUT         only those steps
#   SMOKE=1 bash benchmarks/run_gpu.sh OUT             every step at a tiny size on the CPU (`make gpu-smoke`, in CI):
#                                                      the scripts and this file work; the figures mean nothing
# A device call lasts 10 minutes at most and a session has 15 minutes of device time, machine start included, so
# the default budget fits one call: steps 1-3 measure the targets (the step against open_clip's loop and
# the gradient cache, the loss memory at 32,768, the fed throughput with the JPEGs decoded by the workers and on
# the GPU); the next session runs the rest with STEPS. Each step has its own time limit, cut to what is left of the
# budget; a step with under 30 s left is skipped and named. Exit status 1 if a step failed.
# On the lent machine the packages it lacks travel as wheels in .whl/ (docs/performance.md says which); they are
# installed into /tmp/site here when open_clip cannot be imported.
set -u
out=${1:-benchmarks/out}
mkdir -p "$out"
log=$out/run_gpu.log
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
py=${PYTHON:-python3}
budget=${BUDGET:-540}
start=$SECONDS
failed=() skipped=()

if ! $py -c "import open_clip, webdataset" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

# sizes: the measurement, or the smoke test's (tiny model, CPU, one round)
if [[ -n ${SMOKE:-} ]]; then
  batch=16 big=32 rounds="--rounds 1" steps="--steps 1" sync_steps="--steps 1" batches=256 tile=64 photos=256 recipe_steps=3 fed_steps=3 workers=1
  cpu="--cpu-smoke" decode="--device cpu --samples 64 --tries 2 --batch 16 --corrupt 20" budget_gib=0.5 loader="--samples 128 \
--rounds 1 --batch 16 --size 64"
else
  batch=256 big=1024 rounds="--rounds 3" steps="" sync_steps="" batches=8192,32768 tile=4096 photos=20000 recipe_steps=60 fed_steps=120
  workers=$(( $(nproc) - 2 )) cpu="" decode="--samples 2048 --tries 100" budget_gib=24 loader="--samples 8192 \
--rounds 2 --batch 256"
fi

want() { [[ " ${STEPS:-1 2 3 4 5 6 7 8 9} " == *" $1 "* ]]; }

step() {  # step N LIMIT COMMAND...: COMMAND, if step N is wanted, for at most LIMIT seconds or what is left
  local n=$1 limit=$2 left
  shift 2
  want "$n" || return 0
  left=$(( budget - (SECONDS - start) ))
  if (( left < 30 )); then
    skipped+=("$n: $*")
    return 0
  fi
  (( limit > left )) && limit=$left
  echo "== step $n, at most $limit s, at $(( SECONDS - start )) s: $*" | tee -a "$log"
  timeout -k 20 "$limit" "$@" 2>&1 | grep --line-buffered -v -e Warning -e '^  warnings.warn' | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  (( rc == 0 )) || failed+=("$n (exit $rc$( (( rc == 124 )) && echo ', out of time')): $*")
}

{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.used,memory.total --format=csv \
    2>/dev/null || echo "no nvidia-smi: $(uname -m), $(nproc) CPUs"
  $py -c "import torch, open_clip, accelerate, transformers; print('torch', torch.__version__, 'open_clip', \
open_clip.__version__, 'accelerate', accelerate.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee -a "$log"

# 1. the training step against open_clip's loop (ViT-B-32, bf16, batch 256, the same weights and batches): the
#    vote on the device (no host synchronisation per step) and on the host, and the gradient-cached step in
#    chunks of a quarter of the batch (target: at most 1.3x the plain step; mmcl's, and with every chunk
#    embedded twice as the GradCache paper does); then torch's sync debugger over real
#    steps of tiny runs (CLIP, tiled, FLIP, SigLIP, BYOL, MoCo v3, DINO, SwAV, JPEGs decoded on the GPU): no step
#    may wait
step 1 200 $py benchmarks/clip_step.py --batch $batch $rounds $steps --results "$out/clip_step.json" \
  --variants "mmcl fused AdamW,mmcl fused + host vote,mmcl fused + grad cache B/4,mmcl fused + grad cache B/4 rerun all"
#    then on captions of 2 to 32 tokens (as short as CC3M's), which the recipe cuts after the batch's longest
#    (model.trim_text: 8), against the same ids padded to 77 as open_clip's loop takes them
step 1 120 $py benchmarks/clip_step.py --batch $batch $rounds $steps --results "$out/clip_step.json" \
  --caption-tokens 32 --variants "mmcl fused AdamW,mmcl fused + ids padded"
step 1 150 $py benchmarks/sync_check.py $sync_steps
# 2. CLIP's and SigLIP's loss memory at global batches 8,192 and 32,768: open_clip's losses, mmcl's whole matrix,
#    mmcl's tiles (target: 8x below open_clip's ClipLoss at 32,768, gradients equal)
step 2 150 $py benchmarks/clip_loss_memory.py --batches $batches --tile $tile $rounds
# 3. fed: the CLIP recipe on real photo crops (mmcl-prep photos, 224 px JPEG, built once here), JPEGs decoded by
#    the loader workers, then on the GPU (data.decode: device) (target: fed at least 80 % of step-only, step 1);
#    120 steps, measured after the first 40: on 2026-11-28 the 30 steps measured were mostly the workers filling
#    their prefetch queues at full speed on every core but two (a CPU worker decodes about 1,100 photos/s)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
data=$tmp/photos224
step 3 120 $py -m data_prep photos --out "$data" --samples $photos --size 224 --workers "$(nproc)" --no-progress
#    The photos' captions are short, and cut (model.trim_text) the step would outrun step 1's, whose random ids fill
#    all 77 positions: these runs pad them to 77 as step 1's batches are, so fed and step-only compare
for how in workers device; do
  step 3 150 $py benchmarks/gpu_recipes.py $cpu --recipes clip_vit_b32 --precisions bf16 --steps $fed_steps \
    --workers $workers --data "$data" --set data.decode=$how --set model.trim_text=0 --results "$out/gpu_recipes.json"
done
# 4. compiled: both sides through torch.compile (open_clip's --torchcompile; mmcl's train.compile: true)
step 4 300 $py benchmarks/clip_step.py --batch $batch --compile $rounds $steps --variants "mmcl fused AdamW" \
  --results "$out/clip_step.json"
# 5. decoding on the GPU checked: the same pixels as the workers, no memory written by the decoder while the GPU is
#    busy (pytorch/vision#9606), decode speed, corrupt JPEGs nvJPEG decodes where the workers skip them; then the
#    loader alone, workers against the GPU decoding
step 5 150 $py benchmarks/device_decode_check.py $decode
step 5 240 $py benchmarks/loader_throughput.py $loader --workers $workers
# 6. the largest CLIP ViT-B/32 batch within 24 GiB: plain, gradient checkpointing, gradient caching + tiled loss
step 6 420 $py benchmarks/clip_max_batch.py --budget-gib $budget_gib
# 7. a larger batch per GPU, gradient checkpointing and FLIP patch dropout (measured at 256 and 1024 on 2026-11-28),
#    and the gradient cache in chunks of 256 (at 256 its chunks of 64 may be launch-bound)
step 7 180 $py benchmarks/clip_step.py --batch $big $rounds $steps --results "$out/clip_step.json" \
  --variants "mmcl fused AdamW,mmcl fused + grad ckpt,mmcl fused + patch drop 0.5,mmcl fused + grad cache B/4"
# 8. whole recipes on 224 px digits (CLIP and SimCLR), and the CLIP recipe with fewer loader workers: is the main
#    process, which launches the GPU work, short of CPU time?
step 8 240 $py benchmarks/gpu_recipes.py $cpu --recipes clip_vit_b32,simclr --precisions bf16 \
  --steps $recipe_steps --workers $workers --results "$out/gpu_recipes.json"
step 8 150 $py benchmarks/gpu_recipes.py $cpu --recipes clip_vit_b32 --precisions bf16 --steps $fed_steps \
  --workers 4 --set model.trim_text=0 --results "$out/gpu_recipes.json"
# 9. FSDP2 on the GPU against DDP (equality, resume, export); on a CPU tests/dist/test_fsdp.py checks the same
[[ -z ${SMOKE:-} ]] && step 9 240 $py benchmarks/fsdp_check.py --results "$out/fsdp_check.json"

{
  echo "== done in $(( SECONDS - start )) s of a budget of $budget s"
  for s in "${skipped[@]}"; do echo "skipped, out of budget: step $s"; done
  for f in "${failed[@]}"; do echo "FAILED: step $f"; done
} | tee -a "$log"
(( ${#failed[@]} == 0 ))
