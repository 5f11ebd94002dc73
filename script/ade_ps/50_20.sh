#!/usr/bin/env bash
# ADE20K continual panoptic segmentation 50-20: 50 base classes, then 5 steps of 20.
# Hyper-parameters of the official ECLIPSE script. Environment
# variables (data root, step-0 checkpoint, which steps to run, ...) are listed in script/common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

# the model and class order: BACKBONE / ORDER / CONFIG (script/common.sh)
BENCHMARK=ade_ps
DEFAULT_OUTPUT_ROOT=results/ade_ps
DEFAULT_NAME=adps_50_20
BASE=50; INC=20; STEPS=5; QUERIES=50
STEP0_ITERS=80000; STEP0_LR=0.0001; STEP0_EVAL=5000
PROMPTS=20; ITERS=32000; LR=0.0005; EVAL_PERIOD=4000
TRAIN_DELTAS='[0.4,0.5,0.5,0.5,0.5,0.5]'
EVAL_DELTAS='[0.4,0.5,0.5,0.5,0.5,0.5]'
STEP0_CKPT=results/ade_ps_50_step0.pth
FINAL_CKPT=results/ade_ps_50_20_final.pth

run_scenario
