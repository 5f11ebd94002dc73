#!/usr/bin/env bash
# A continual panoptic scenario on your own COCO-panoptic-format dataset (docs/custom_dataset.md):
#
#   DATASET_FILE=my_data.yaml BASE=6 INC=2 RUN_STEP0=1 bash script/custom.sh
#
# DATASET_FILE   the dataset description (name, root, classes, splits train and val); registered
#                as <name>_panoptic_{train,val} (mask2former/data/datasets/register_custom.py)
# CLASS_ORDER    class ids in learning order, e.g. '[3,1,2,4]' (default: every class of the
#                description, ascending ids)
# BASE, INC      classes of step 0, classes of every later step (required)
# MODE           image membership: overlap (default), disjoint or sequential
# CONFIG         model config (default: the ADE20K panoptic R50 recipe of the official scripts)
# The schedule defaults are those of ADE20K panoptic 100-5 (script/ade_ps/100_5.sh); override them
# with STEP0_ITERS, STEP0_LR, PROMPTS, ITERS, LR, QUERIES, TRAIN_DELTAS, EVAL_DELTAS. Every other
# variable of script/common.sh works as for the official scenarios (RUN_STEP0, STEP0_WEIGHTS,
# NUM_GPUS, IMS_PER_DEVICE, JOINT=1, EXTRA_ARGS, ...).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

BENCHMARK=custom
[ -n "${DATASET_FILE:-}" ] || die "set DATASET_FILE=path/to/description.yaml (format: docs/custom_dataset.md)"
[ -f "$DATASET_FILE" ] || die "DATASET_FILE=$DATASET_FILE does not exist"
[ -n "${BASE:-}" ] && [ -n "${INC:-}" ] || die "set BASE (classes of step 0) and INC (classes per later step)"
keys=$(cd "$REPO_ROOT" && "${PYTHON:-python}" -m mask2former.data.datasets.register_custom keys "$(realpath "$DATASET_FILE")") \
    || die "could not read the dataset description $DATASET_FILE (see the error above)"
eval "$keys"   # DATASET_NAME CLASS_IDS NUM_CLASSES TRAIN_SET TEST_SET
CLASS_ORDER=${CLASS_ORDER:-$CLASS_IDS}
num=$(echo "$CLASS_ORDER" | tr -d '[] ' | tr ',' '\n' | grep -c .)
[ "$num" -gt "$BASE" ] || die "CLASS_ORDER has $num classes: BASE=$BASE leaves none for the later steps (JOINT=1 needs a split too)"
(( (num - BASE) % INC == 0 )) || die "CLASS_ORDER has $num classes: $num - BASE=$BASE is not a multiple of INC=$INC"
STEPS=$(( (num - BASE) / INC ))
CUSTOM_CONFIG=$REPO_ROOT/configs/ade20k/panoptic-segmentation/maskformer2_R50_bs16_160k.yaml
CUSTOM_OPTS=(DATASETS.CUSTOM_FILE "$(realpath "$DATASET_FILE")" DATASETS.TRAIN "(\"$TRAIN_SET\",)"
    DATASETS.TEST "(\"$TEST_SET\",)" CONT.ORDER "$CLASS_ORDER" MODEL.SEM_SEG_HEAD.NUM_CLASSES "$NUM_CLASSES")
DEFAULT_OUTPUT_ROOT=results/custom
DEFAULT_NAME=${DATASET_NAME}_${BASE}_${INC}
QUERIES=${QUERIES:-100}
STEP0_ITERS=${STEP0_ITERS:-160000}; STEP0_LR=${STEP0_LR:-0.0001}; STEP0_EVAL=${STEP0_EVAL:-5000}
PROMPTS=${PROMPTS:-10}; ITERS=${ITERS:-12000}; LR=${LR:-0.0005}; EVAL_PERIOD=${EVAL_PERIOD:-2000}
deltas="[0.4$(for ((t = 0; t < STEPS; t++)); do printf ',0.6'; done)]"
TRAIN_DELTAS=${TRAIN_DELTAS:-$deltas}
EVAL_DELTAS=${EVAL_DELTAS:-$deltas}
STEP0_CKPT=; FINAL_CKPT=

run_scenario
