#!/usr/bin/env bash
# ADE20K continual semantic segmentation 100-50 (R101): 100 base classes, then 1 step of 50.
# Hyper-parameters of the official ECLIPSE script. Environment
# variables (data root, step-0 checkpoint, which steps to run, ...) are listed in script/common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

# the model and class order: BACKBONE / ORDER / CONFIG (script/common.sh)
BENCHMARK=ade_ss
DEFAULT_OUTPUT_ROOT=results/ade_ss
DEFAULT_NAME=adss_100_50
BASE=100; INC=50; STEPS=1; QUERIES=100
STEP0_ITERS=160000; STEP0_LR=0.0001; STEP0_EVAL=5000
PROMPTS=50; ITERS=120000; LR=0.001; EVAL_PERIOD=4000
TRAIN_DELTAS='[-0.3,-0.6]'
EVAL_DELTAS='[0.0,-0.1]'
STEP0_CKPT=results/ade_ss_100_step0.pth
FINAL_CKPT=results/ade_ss_100_50_final.pth

run_scenario
