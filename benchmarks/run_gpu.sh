#!/usr/bin/env bash
# Every GPU benchmark of docs/performance.md in one go, results and logs under OUT (default benchmarks/out):
#   bash benchmarks/run_gpu.sh [OUT]            every step (about 35 minutes)
#   STEPS="1 6" bash benchmarks/run_gpu.sh OUT   only those steps (a device call may last 10 minutes at most)
# Each step has its own time limit, so one that hangs does not take the others' time.
set -u
out=${1:-benchmarks/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
want() { [[ " ${STEPS:-1 2 3 4 5 6 7 8} " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.used,memory.total --format=csv
$py -c "import torch, open_clip, accelerate, transformers; print('torch', torch.__version__, 'open_clip', open_clip.__version__, 'accelerate', accelerate.__version__, 'transformers', transformers.__version__)"
# 1. the training step, mmcl against open_clip's loop (ViT-B-32, bf16), at open_clip's batch and a larger one
if want 1; then
  timeout 240 $py benchmarks/clip_step.py --batch 256 --results "$out/clip_step.json" 2>&1 | tee "$out/clip_step.log" | grep -v Warning
  timeout 120 $py benchmarks/clip_step.py --batch 1024 --rounds 3 --variants "mmcl fused AdamW,mmcl fused + grad ckpt,mmcl fused + patch drop 0.5" \
    --results "$out/clip_step.json" 2>&1 | tee -a "$out/clip_step.log" | grep -v Warning
fi
# 2. whole recipes through accelerate launch, loader included (224 px JPEG digits shards)
if want 2; then
  timeout 240 $py benchmarks/gpu_recipes.py --recipes clip_vit_b32,simclr --precisions bf16 --steps 30 \
    --results "$out/gpu_recipes.json" 2>&1 | tee "$out/gpu_recipes.log" | grep -v Warning
fi
# 3. compiled: both sides through torch.compile (open_clip's --torchcompile; mmcl's train.compile: true)
if want 3; then
  timeout 300 $py benchmarks/clip_step.py --batch 256 --compile --rounds 3 --variants "mmcl fused AdamW" \
    --results "$out/clip_step.json" 2>&1 | tee -a "$out/clip_step.log" | grep -v Warning
fi
# 4. the CLIP recipe with fewer loader workers: is the main process short of CPU time?
if want 4; then
  for w in 4 8; do
    timeout 120 $py benchmarks/gpu_recipes.py --recipes clip_vit_b32 --precisions bf16 --steps 30 --workers $w \
      --results "$out/gpu_recipes.json" 2>&1 | tee -a "$out/gpu_recipes.log" | grep -v Warning
  done
fi
# 5. the CLIP recipe on 20,000 crops of real photos (mmcl-prep photos: 224 px JPEG, built in a temporary folder as
#    step 2 builds its digits): upscaled 8x8 digits decode faster than photographs, so step 2 flatters the loader.
#    Ten photos with scikit-image installed, else scikit-learn's two (the build prints a note); same pixels per image.
if want 5; then
  timeout 240 $py benchmarks/gpu_recipes.py --recipes clip_vit_b32 --precisions bf16 --steps 30 --photos 20000 \
    --results "$out/gpu_recipes.json" 2>&1 | tee -a "$out/gpu_recipes.log" | grep -v Warning
fi
# 6. CLIP's loss memory at large global batches: open_clip's ClipLoss, mmcl's whole matrix, mmcl's tiles
if want 6; then
  timeout 240 $py benchmarks/clip_loss_memory.py --batches 8192,32768 --tile 4096 --rounds 2 2>&1 \
    | tee "$out/clip_loss_memory.log" | grep -v Warning
fi
# 7. the largest CLIP ViT-B/32 batch within 24 GiB: plain, gradient checkpointing, gradient caching + tiled loss
if want 7; then
  timeout 420 $py benchmarks/clip_max_batch.py --budget-gib 24 2>&1 | tee "$out/clip_max_batch.log" | grep -v Warning
fi
# 8. JPEGs decoded and cropped on the GPU (data.decode: device, nvJPEG): first its check (same pixels as the workers,
#    no memory corrupted by the decoder while the GPU is busy, decode speed), then the photos run of step 5 with it,
#    then the loader alone on the same kind of shards: workers decoding against the GPU decoding, side by side
if want 8; then
  timeout 180 $py benchmarks/device_decode_check.py --samples 2048 --tries 100 2>&1 \
    | tee "$out/device_decode_check.log" | grep -v Warning
  timeout 240 $py benchmarks/gpu_recipes.py --recipes clip_vit_b32 --precisions bf16 --steps 30 --photos 20000 \
    --set data.decode=device --results "$out/gpu_recipes.json" 2>&1 | tee -a "$out/gpu_recipes.log" | grep -v Warning
  timeout 240 $py benchmarks/loader_throughput.py --samples 8192 --workers 4 --rounds 2 --batch 256 2>&1 \
    | tee "$out/loader_throughput.log" | grep -v Warning
fi
