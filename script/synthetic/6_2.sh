#!/usr/bin/env bash
# The synthetic continual panoptic benchmark: 10 generated classes, 6 base classes, then 2 steps of
# 2, with the tiny CPU model of configs/synthetic/maskformer2_R18_tiny.yaml. Generate the data
# first: python datasets/generate_synthetic.py (writes $DETECTRON2_DATASETS/synthetic), or run the
# whole benchmark (data, this script, the fine-tuning and CoMFormer baselines, table, plot) with `make demo`
# (tools/synthetic_benchmark.py).
# Environment variables are listed in script/common.sh; here step 0 is part of the run. The
# settings below may be overridden from the environment too (STEP0_ITERS, STEP0_LR, ITERS, LR,
# PROMPTS, TRAIN_DELTAS, EVAL_DELTAS). METHOD=ft|mib|plop|comformer runs a baseline instead of
# ECLIPSE (no prompts, the whole model trained on the new classes; script/common.sh).
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

BENCHMARK=synthetic
SYNTHETIC_CONFIG=$REPO_ROOT/configs/synthetic/maskformer2_R18_tiny.yaml
DEFAULT_OUTPUT_ROOT=output/synthetic
DEFAULT_NAME=syn_6_2
BASE=6; INC=2; STEPS=2; QUERIES=16
# about 3 minutes on 2 CPU cores; base PQ ~85 on the benchmark's data (README)
STEP0_ITERS=${STEP0_ITERS:-1000}; STEP0_LR=${STEP0_LR:-0.0003}; STEP0_EVAL=100000
# prompt tuning is cheap (no backward through the frozen network): about 1 minute per step
PROMPTS=${PROMPTS:-4}; ITERS=${ITERS:-1000}; LR=${LR:-0.003}; EVAL_PERIOD=100000
# the base group's no-object logit from the other groups' class scores (delta > 0), as the
# official ADE20K scripts do; this keeps the base classes' PQ of step 0
TRAIN_DELTAS=${TRAIN_DELTAS:-'[0.4,0.6,0.6]'}
EVAL_DELTAS=${EVAL_DELTAS:-'[0.4,0.6,0.6]'}
STEP0_CKPT=output/synthetic/step0.pth
FINAL_CKPT=output/synthetic/final.pth
RUN_STEP0=${RUN_STEP0:-1}

run_scenario
