#!/usr/bin/env bash
# ADE20K continual semantic segmentation 100-5 (R101): 100 base classes, then 10 steps of 5.
# Hyper-parameters of the official ECLIPSE script. Environment
# variables (data root, step-0 checkpoint, which steps to run, ...) are listed in script/common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

# the model and class order: BACKBONE / ORDER / CONFIG (script/common.sh)
BENCHMARK=ade_ss
DEFAULT_OUTPUT_ROOT=results/ade_ss
DEFAULT_NAME=adss_100_5
BASE=100; INC=5; STEPS=10; QUERIES=100
STEP0_ITERS=160000; STEP0_LR=0.0001; STEP0_EVAL=5000
PROMPTS=5; ITERS=12000; LR=0.001; EVAL_PERIOD=2000
TRAIN_DELTAS='[0.1,0.8,0.8,0.8,0.8,0.8,0.8,0.8,0.8,0.8,0.8]'
EVAL_DELTAS='[0.1,0.8,0.8,0.8,0.8,0.8,0.8,0.8,0.8,0.8,0.8]'
STEP0_CKPT=results/ade_ss_100_step0.pth
FINAL_CKPT=results/ade_ss_100_5_final.pth

run_scenario
