#!/usr/bin/env bash
# ADE20K continual panoptic segmentation 50-10: 50 base classes, then 10 steps of 10.
# Hyper-parameters of the official ECLIPSE script. Environment
# variables (data root, step-0 checkpoint, which steps to run, ...) are listed in script/common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

# the model and class order: BACKBONE / ORDER / CONFIG (script/common.sh)
BENCHMARK=ade_ps
DEFAULT_OUTPUT_ROOT=results/ade_ps
DEFAULT_NAME=adps_50_10
BASE=50; INC=10; STEPS=10; QUERIES=50
STEP0_ITERS=80000; STEP0_LR=0.0001; STEP0_EVAL=5000
PROMPTS=10; ITERS=24000; LR=0.0005; EVAL_PERIOD=4000
TRAIN_DELTAS='[0.4,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5]'
EVAL_DELTAS='[0.4,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5]'
STEP0_CKPT=results/ade_ps_50_step0.pth
FINAL_CKPT=results/ade_ps_50_10_final.pth

run_scenario
