#!/usr/bin/env bash
# The prepared GPU benchmark: the KDFAS pair (ViT-L/16 teacher -> ViT-B/16 student) at 224 px, bf16,
# batch 128, on synthetic tensors, through `kdkit bench`: modes (a)-(e) eagerly (e: (b) compiled),
# then (a)-(c) with every model compiled (train.compile), then (a) and (b) with two ViT-L/16 teachers
# (the same teacher twice: the cost of two ViT-L-class teachers, and each one's share of the step),
# with images/s, peak GPU memory and MFU (2 x MAC FLOPs over the GPU's dense bf16 peak). Prints one
# JSON object; about 6-9 minutes on an H100/H200 (compilation included).
#
#   benchmarks/gpu.sh            # on the GPU machine, from the repository root
#   benchmarks/gpu.sh --tiny     # the same script on the CPU at a toy size (what the tests run)
#
# Needs kdkit installed (make install); KDKIT=path/to/kdkit picks another executable.
set -euo pipefail
cd "$(dirname "$0")/.."
KDKIT=${KDKIT:-.venv/bin/kdkit}
if [[ "${1:-}" == "--tiny" ]]; then
    # A 4-block/2-block ViT pair of width 48/32 at 32 px on the CPU, fp32: checks the script only
    # (the eager run leaves out (e), the compiled one measures (b) only: one compilation in all).
    eager_only=(--no-compile)
    compiled_only=(--modes distill)
    args=(recipes/kdfas.yaml --batch 4 --steps 1 --warmup 1 --repeats 1
          --set data.image_size=32 --set train.amp=none --set train.device=cpu
          --set distill.teacher_dtype=float32 --set "distill.pairs=[[1, 2], [2, 4]]")
    for model in teacher student; do
        args+=(--set "models.$model.options.img_size=32" --set "models.$model.options.patch_size=8"
               --set "models.$model.options.num_heads=2")
    done
    args+=(--set models.teacher.options.depth=4 --set models.teacher.options.embed_dim=48
           --set models.student.options.depth=2 --set models.student.options.embed_dim=32)
else
    eager_only=()
    compiled_only=(--modes student,distill,cached)
    args=(recipes/kdfas.yaml --batch 128 --steps 20 --warmup 5 --repeats 3
          --set train.amp=bf16 --set train.device=cuda --set distill.teacher_dtype=bfloat16)
fi
eager=$("$KDKIT" bench "${args[@]}" "${eager_only[@]}" --no-data --json)
compiled=$("$KDKIT" bench "${args[@]}" "${compiled_only[@]}" --no-data --set train.compile=true --json)
two=$("$KDKIT" bench "${args[@]}" --modes student,distill --no-data --json \
      --set "distill.teachers=[{teacher: teacher}, {teacher: teacher}]")
python3 -c 'import json, sys
eager, compiled, two = (json.loads(arg) for arg in sys.argv[1:4])
print(json.dumps({"benchmark": "kdkit benchmarks/gpu.sh", "tiny": sys.argv[4] == "--tiny",
                  "gpu": eager["machine"].get("gpu"), "eager": eager, "compiled": compiled,
                  "two_teachers": two}, indent=2))' \
    "$eager" "$compiled" "$two" "${1:-}"
