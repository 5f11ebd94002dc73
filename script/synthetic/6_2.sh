#!/usr/bin/env bash
# The synthetic continual panoptic benchmark: 10 generated classes, 6 base classes, then 2 steps of
# 2, with the tiny CPU model of configs/synthetic/maskformer2_R18_tiny.yaml. Generate the data
# first: python datasets/generate_synthetic.py (writes $DETECTRON2_DATASETS/synthetic).
# Environment variables are listed in script/common.sh; here step 0 is part of the run.
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

CONFIG=${CONFIG:-$REPO_ROOT/configs/synthetic/maskformer2_R18_tiny.yaml}
DEFAULT_OUTPUT_ROOT=output/synthetic
DEFAULT_NAME=syn_6_2
BASE=6; INC=2; STEPS=2; QUERIES=16
STEP0_ITERS=${STEP0_ITERS:-600}; STEP0_LR=0.0003; STEP0_EVAL=100000
PROMPTS=4; ITERS=${ITERS:-300}; LR=0.001; EVAL_PERIOD=100000
TRAIN_DELTAS='[0.4,0.6,0.6]'
EVAL_DELTAS='[0.4,0.6,0.6]'
STEP0_CKPT=output/synthetic/step0.pth
FINAL_CKPT=output/synthetic/final.pth
RUN_STEP0=${RUN_STEP0:-1}

run_scenario
