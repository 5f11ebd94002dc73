#!/usr/bin/env bash
# ADE20K continual panoptic segmentation 100-5: 100 base classes, then 10 steps of 5.
# Hyper-parameters of the official ECLIPSE script. Environment
# variables (data root, step-0 checkpoint, which steps to run, ...) are listed in script/common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

# the model and class order: BACKBONE / ORDER / CONFIG (script/common.sh)
BENCHMARK=ade_ps
DEFAULT_OUTPUT_ROOT=results/ade_ps
DEFAULT_NAME=adps_100_5
BASE=100; INC=5; STEPS=10; QUERIES=100
STEP0_ITERS=160000; STEP0_LR=0.0001; STEP0_EVAL=5000
PROMPTS=10; ITERS=12000; LR=0.0005; EVAL_PERIOD=2000
TRAIN_DELTAS='0.5'
EVAL_DELTAS='[0.4,0.6,0.6,0.6,0.6,0.6,0.6,0.6,0.6,0.6,0.6]'
STEP0_CKPT=results/ade_ps_100_step0.pth
FINAL_CKPT=results/ade_ps_100_5_final.pth

run_scenario
