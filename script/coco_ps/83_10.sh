#!/usr/bin/env bash
# COCO continual panoptic segmentation 83-10 (class order c): 83 base classes, then 5 steps of 10.
# Hyper-parameters of the official ECLIPSE script. Environment
# variables (data root, step-0 checkpoint, which steps to run, ...) are listed in script/common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

# the model and class order: BACKBONE / ORDER / CONFIG (script/common.sh)
BENCHMARK=coco_ps
DEFAULT_OUTPUT_ROOT=results/ade_ps
DEFAULT_NAME=coco-ps_83_10
BASE=83; INC=10; STEPS=5; QUERIES=100
STEP0_ITERS=240000; STEP0_LR=0.0001; STEP0_EVAL=5000
PROMPTS=10; ITERS=32000; LR=0.0005; EVAL_PERIOD=4000
TRAIN_DELTAS='[0.5,0.6,0.6,0.6,0.6,0.6]'
EVAL_DELTAS='[0.5,0.6,0.6,0.6,0.6,0.6]'
STEP0_CKPT=results/coco_ps_83_step0.pth
FINAL_CKPT=results/coco_ps_83_10_final.pth

run_scenario
