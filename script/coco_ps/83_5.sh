#!/usr/bin/env bash
# COCO continual panoptic segmentation 83-5 (class order c): 83 base classes, then 10 steps of 5.
# Hyper-parameters of the official ECLIPSE script. Environment
# variables (data root, step-0 checkpoint, which steps to run, ...) are listed in script/common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

# the model and class order: BACKBONE / ORDER / CONFIG (script/common.sh)
BENCHMARK=coco_ps
DEFAULT_OUTPUT_ROOT=results/ade_ps
DEFAULT_NAME=coco-ps_83_5
BASE=83; INC=5; STEPS=10; QUERIES=100
STEP0_ITERS=240000; STEP0_LR=0.0001; STEP0_EVAL=5000
PROMPTS=10; ITERS=8000; LR=0.0005; EVAL_PERIOD=2000
TRAIN_DELTAS='[0.5,0.6,0.6,0.6,0.6,0.6,0.6,0.6,0.6,0.6,0.6]'
EVAL_DELTAS='[0.5,0.6,0.6,0.6,0.6,0.6,0.6,0.6,0.6,0.6,0.6]'
STEP0_CKPT=results/coco_ps_83_step0.pth
FINAL_CKPT=results/coco_ps_83_5_final.pth

run_scenario
