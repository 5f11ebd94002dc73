#!/usr/bin/env bash
# The worked example of docs/custom_dataset.md: a generated COCO-panoptic-format dataset, a
# continual scenario of your own on it (order, 6 base classes, steps of 2), ECLIPSE trained and
# evaluated, then the joint upper bound of the same scenario. Runs on a CPU with the tiny model.
#
#   bash docs/custom_dataset/run_example.sh        # about 10 minutes on 2 CPU cores
#
# Sizes and schedule from the environment: NUM_TRAIN (120), NUM_VAL (20), SIZE (96),
# STEP0_ITERS (400), ITERS (300), OUTPUT_ROOT (output/custom_example), DETECTRON2_DATASETS
# (output/custom_example/data), PYTHON.
set -euo pipefail
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO_ROOT"
PYTHON=${PYTHON:-python}
export OUTPUT_ROOT=${OUTPUT_ROOT:-output/custom_example}
export DETECTRON2_DATASETS=${DETECTRON2_DATASETS:-$OUTPUT_ROOT/data}
mkdir -p "$DETECTRON2_DATASETS"

# 1. the data: any COCO panoptic data works; here a generated stand-in in $DETECTRON2_DATASETS/shapes
"$PYTHON" datasets/generate_synthetic.py --root "$DETECTRON2_DATASETS/shapes" \
    --num-train "${NUM_TRAIN:-120}" --num-val "${NUM_VAL:-20}" --size "${SIZE:-96}"

# 2. check that the description and the annotations agree
"$PYTHON" -m mask2former.data.datasets.register_custom check docs/custom_dataset/shapes.yaml

# 3. the scenario: the stuff classes and two shapes first, then cross+bar, then triangle+ring
export DATASET_FILE=docs/custom_dataset/shapes.yaml CLASS_ORDER='[1,2,3,4,5,6,9,10,7,8]' BASE=6 INC=2
export CONFIG=configs/synthetic/maskformer2_R18_tiny.yaml QUERIES=16 PROMPTS=4 LR=0.003 STEP0_LR=0.0003
export STEP0_ITERS=${STEP0_ITERS:-400} ITERS=${ITERS:-300} STEP0_EVAL=100000 EVAL_PERIOD=100000
export EXTRA_ARGS="${EXTRA_ARGS:-} CONT.RESULTS_DIR $OUTPUT_ROOT/results"
RUN_STEP0=1 bash script/custom.sh            # step 0, steps 1-2 (ECLIPSE), final evaluation

# 4. the joint upper bound of the same scenario (all 10 classes at once, same base/new split)
JOINT=1 bash script/custom.sh

"$PYTHON" - "$OUTPUT_ROOT" <<'PY'
import json, sys
from pathlib import Path
root = Path(sys.argv[1]) / "sha-pan_6-2-ov"
final = json.loads((root / "shapes_6_2" / "metrics.json").read_text())["2-eval"]["panoptic_seg"]
joint = json.loads((root / "shapes_6_2_joint" / "metrics.json").read_text())["0"]["panoptic_seg"]
print("| run | PQ base | PQ novel | PQ all |\n|---|---|---|---|")
for name, m in (("ECLIPSE, after step 2", final), ("joint upper bound", joint)):
    print(f"| {name} | {m['PQ_base']:.1f} | {m['PQ_novel']:.1f} | {m['PQ']:.1f} |")
PY
