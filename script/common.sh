# Shared driver of the scenario scripts (sourced by script/<benchmark>/<scenario>.sh).
#
# A scenario script sets its benchmark (BENCHMARK: ade_ps, ade_ss, coco_ps, synthetic or custom) and the
# official hyper-parameters (BASE, INC, STEPS, QUERIES, STEP0_*, PROMPTS, ITERS, LR, EVAL_PERIOD,
# TRAIN_DELTAS, EVAL_DELTAS, STEP0_CKPT, FINAL_CKPT) and calls run_scenario. The model and class
# order come from select_variant below. Users steer a run with environment variables:
#
#   BACKBONE             R50 | R101 | swin_t | swin_s | swin_b | swin_b_in21k | swin_l (default: the
#                        official scripts' backbone: R50, R101 for ADE20K semantic)
#   ORDER                class order: b..j (ADE20K panoptic), b (ADE20K semantic), c (COCO; the
#                        default there); default: the official scripts' order
#   CONFIG               a config file to use instead (then BACKBONE / ORDER must be unset)
#   NUM_QUERIES          base queries instead of the scenario's QUERIES
#   DETECTRON2_DATASETS  dataset root (default: datasets); must exist
#   STEP0_WEIGHTS        step-0 checkpoint to start step 1 from (default: the released file name
#                        under results/, e.g. results/ade_ps_100_step0.pth)
#   RUN_STEP0=1          train step 0 here instead of loading STEP0_WEIGHTS
#   FIRST_STEP, LAST_STEP  train only steps FIRST_STEP..LAST_STEP (default 1..STEPS)
#   RUN_EVAL=0           skip the final evaluation with the evaluation deltas
#   EVAL_WEIGHTS         checkpoint for the final evaluation (default: this run's last step;
#                        e.g. the released results/ade_ps_100_5_final.pth)
#   NAME, OUTPUT_ROOT    run name and output root (outputs: OUTPUT_ROOT/<task name>/NAME/step<t>)
#   NUM_GPUS             processes (default: number of GPUs from nvidia-smi, else 1)
#   IMS_PER_DEVICE       most images per device and forward pass (default: the official runs'
#                        per-GPU batch, their global batch on 4 GPUs: 2 for ADE20K panoptic and
#                        script/custom.sh, 4 for ADE20K semantic and COCO; 0 = no limit): on
#                        fewer GPUs the global batch SOLVER.IMS_PER_BATCH stays the config's and
#                        every process accumulates gradients over micro-batches
#                        (SOLVER.MAX_IMS_PER_DEVICE, README)
#   JOINT=1              train the joint upper bound instead: one model on all classes of the
#                        scenario at once (step-0 schedule, JOINT_ITERS iterations, default
#                        STEP0_ITERS), evaluated with the scenario's base/new split; run name
#                        NAME + _joint
#   PYTHON               interpreter (default: python)
#   EXTRA_ARGS           extra KEY VALUE overrides appended to every command (e.g. a smaller model)
#   RESUME=1             pass --resume (continue interrupted steps)
#   PRINT_SETTINGS=1     print the scenario's settings (KEY=VALUE lines) and run nothing
#   MODE                 image membership: overlap (default, the official scripts), disjoint,
#                        sequential
#   METHOD               eclipse (default) | ft | mib | plop | comformer: the steps > 0 train
#                        ECLIPSE's prompts, or a baseline that fine-tunes the whole model
#                        (CONT.NUM_PROMPTS 0) with the CONT.DIST keys of select_method below;
#                        the run NAME gets the suffix _<METHOD>
#   BASELINE_ITERS, BASELINE_LR  iterations / learning rate of a baseline's steps (default:
#                        400 per new class, 5e-5)
set -euo pipefail
# the variables that select a variant, captured before a scenario script sets its own values
USER_CONFIG=${CONFIG:-}
unset CONFIG

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"

die() { echo "error: $*" >&2; exit 1; }

count_gpus() {
    if [ -n "${NUM_GPUS:-}" ]; then echo "$NUM_GPUS"; return; fi
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --list-gpus >/dev/null 2>&1; then
        local n; n=$(nvidia-smi --list-gpus | wc -l)
        [ "$n" -gt 0 ] && { echo "$n"; return; }
    fi
    echo 1
}

# ---- variants: the one place where a scenario's model and class order are chosen --------------
# Config file of a backbone on a benchmark (configs/..., the official file names).
backbone_config() {
    case "$1/$2" in
        ade_ps/R50)  echo ade20k/panoptic-segmentation/maskformer2_R50_bs16_160k.yaml ;;
        ade_ps/R101) echo ade20k/panoptic-segmentation/maskformer2_R101_bs16_160k.yaml ;;
        ade_ps/swin_t) echo ade20k/panoptic-segmentation/swin/maskformer2_swin_tiny_bs16_160k.yaml ;;
        ade_ps/swin_s) echo ade20k/panoptic-segmentation/swin/maskformer2_swin_small_bs16_160k.yaml ;;
        ade_ps/swin_b) echo ade20k/panoptic-segmentation/swin/maskformer2_swin_base_384_bs16_160k.yaml ;;
        ade_ps/swin_b_in21k) echo ade20k/panoptic-segmentation/swin/maskformer2_swin_base_IN21k_384_bs16_160k.yaml ;;
        ade_ps/swin_l) echo ade20k/panoptic-segmentation/swin/maskformer2_swin_large_IN21k_384_bs16_160k.yaml ;;
        ade_ss/R50)  echo ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml ;;
        ade_ss/R101) echo ade20k/semantic-segmentation/maskformer2_R101_bs16_90k.yaml ;;
        ade_ss/swin_t) echo ade20k/semantic-segmentation/swin/maskformer2_swin_tiny_bs16_160k.yaml ;;
        ade_ss/swin_s) echo ade20k/semantic-segmentation/swin/maskformer2_swin_small_bs16_160k.yaml ;;
        ade_ss/swin_b) echo ade20k/semantic-segmentation/swin/maskformer2_swin_base_384_bs16_160k_res640.yaml ;;
        ade_ss/swin_b_in21k) echo ade20k/semantic-segmentation/swin/maskformer2_swin_base_IN21k_384_bs16_160k_res640.yaml ;;
        ade_ss/swin_l) echo ade20k/semantic-segmentation/swin/maskformer2_swin_large_IN21k_384_bs16_160k_res640.yaml ;;
        coco_ps/R50)  echo coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml ;;
        coco_ps/R101) echo coco/panoptic-segmentation/maskformer2_R101_bs16_50ep.yaml ;;
        coco_ps/swin_t) echo coco/panoptic-segmentation/swin/maskformer2_swin_tiny_bs16_50ep.yaml ;;
        coco_ps/swin_s) echo coco/panoptic-segmentation/swin/maskformer2_swin_small_bs16_50ep.yaml ;;
        coco_ps/swin_b) echo coco/panoptic-segmentation/swin/maskformer2_swin_base_384_bs16_50ep.yaml ;;
        coco_ps/swin_b_in21k) echo coco/panoptic-segmentation/swin/maskformer2_swin_base_IN21k_384_bs16_50ep.yaml ;;
        coco_ps/swin_l) echo coco/panoptic-segmentation/swin/maskformer2_swin_large_IN21k_384_bs16_100ep.yaml ;;
        *) return 1 ;;
    esac
}
BACKBONES="R50 R101 swin_t swin_s swin_b swin_b_in21k swin_l"

# Config file of a named class order on a benchmark, and the backbone that file builds.
order_config() {
    case "$1/$2" in
        ade_ps/[b-j]) echo "ade20k/panoptic-segmentation/continual_$2.yaml R50" ;;
        ade_ss/b)     echo "ade20k/semantic-segmentation/maskformer2_R101_bs16_90k_b.yaml R101" ;;
        coco_ps/c)    echo "coco/panoptic-segmentation/continual_c.yaml R50" ;;
        *) return 1 ;;
    esac
}
orders_of() {
    case "$1" in ade_ps) echo "b c d e f g h i j" ;; ade_ss) echo "b" ;; coco_ps) echo "c" ;; esac
}

# Sets CONFIG (absolute path), VARIANT_OPTS (overrides that go with it), VARIANT (a NAME suffix,
# empty for the official scripts' variant) and VARIANT_DEFAULT (1 for that variant).
select_variant() {
    local default_backbone=R50 default_order=
    case "$BENCHMARK" in
        ade_ps) ;;
        ade_ss) default_backbone=R101 ;;
        coco_ps) default_order=c ;;
        synthetic)
            [ -z "${BACKBONE:-}${ORDER:-}" ] || die "script/synthetic takes no BACKBONE / ORDER (its model is configs/synthetic/maskformer2_R18_tiny.yaml); unset them"
            CONFIG=${USER_CONFIG:-$SYNTHETIC_CONFIG}; VARIANT_OPTS=(); VARIANT=; VARIANT_DEFAULT=1
            PER_DEVICE_DEFAULT=0  # its global batch of 2 fits any device
            return 0 ;;
        custom)
            [ -z "${BACKBONE:-}${ORDER:-}" ] || die "script/custom.sh takes CONFIG (the model config) and CLASS_ORDER, not BACKBONE / ORDER; unset them"
            CONFIG=${USER_CONFIG:-$CUSTOM_CONFIG}; VARIANT_OPTS=("${CUSTOM_OPTS[@]}"); VARIANT=; VARIANT_DEFAULT=0
            PER_DEVICE_DEFAULT=2  # the default CONFIG's: ADE20K panoptic, 8 images on 4 GPUs
            return 0 ;;
        *) die "unknown BENCHMARK=$BENCHMARK in the scenario script" ;;
    esac
    VARIANT_OPTS=(); VARIANT=; VARIANT_DEFAULT=1
    # the official runs' images per GPU: global batch 8 (ADE20K panoptic) or 16 on 4 GPUs
    if [ "$BENCHMARK" = ade_ps ]; then PER_DEVICE_DEFAULT=2; else PER_DEVICE_DEFAULT=4; fi
    if [ -n "$USER_CONFIG" ]; then
        [ -z "${BACKBONE:-}${ORDER:-}" ] || die "set either CONFIG or BACKBONE / ORDER, not both (CONFIG=$USER_CONFIG BACKBONE=${BACKBONE:-} ORDER=${ORDER:-})"
        CONFIG=$USER_CONFIG; VARIANT_DEFAULT=0
        return 0
    fi
    local backbone=${BACKBONE:-$default_backbone} order=${ORDER:-$default_order}
    local bfile; bfile=$(backbone_config "$BENCHMARK" "$backbone") \
        || die "unknown BACKBONE=$backbone for $BENCHMARK: use one of $BACKBONES (or CONFIG=path/to/config.yaml)"
    if [ -z "$order" ]; then
        CONFIG=$REPO_ROOT/configs/$bfile
    else
        local spec; spec=$(order_config "$BENCHMARK" "$order") \
            || die "unknown ORDER=$order for $BENCHMARK: the official orders are: $(orders_of "$BENCHMARK") (unset ORDER for the scripts' default order)"
        local ofile=${spec% *} obackbone=${spec#* }
        if [ "$obackbone" = "$backbone" ]; then
            CONFIG=$REPO_ROOT/configs/$ofile          # the official file of this order
        else                                         # another backbone: its file plus the order's list
            CONFIG=$REPO_ROOT/configs/$bfile
            local list; list=$("${PYTHON:-python}" -c 'import sys, yaml; print(str(list(yaml.safe_load(open(sys.argv[1]))["CONT"]["ORDER"])).replace(" ", ""))' \
                "$REPO_ROOT/configs/$ofile") || die "could not read CONT.ORDER from configs/$ofile"
            VARIANT_OPTS=(CONT.ORDER "$list" CONT.ORDER_NAME "$order")
        fi
    fi
    [ "$backbone" = "$default_backbone" ] || VARIANT=_$backbone
    [ "$backbone" = "$default_backbone" ] && [ "$order" = "$default_order" ] || VARIANT_DEFAULT=0
    if [ "$backbone" = swin_l ] && [ "$BENCHMARK" != ade_ss ] && [ -z "${NUM_QUERIES:-}" ]; then
        echo "note: the Swin-L config has 200 queries; this scenario passes QUERIES=$QUERIES as the official scripts do (NUM_QUERIES=200 keeps the config's value)" >&2
    fi
}

# Sets STEP_OPTS (the keys of steps > 0), METHOD_SUFFIX and EVAL_DELTA_OPTS for METHOD.
# Baselines: the hyper-parameters of CoMFormer's ADE20K panoptic scripts (400 iterations per new
# class at learning rate 5e-5, class weight 2 as at step 0); see README, "The distillation
# baselines", for the source of every value.
select_method() {
    local method=${METHOD:-eclipse}
    METHOD_SUFFIX=; EVAL_DELTA_OPTS=(CONT.LOGIT_MANI_DELTAS "$EVAL_DELTAS")
    if [ "$method" = eclipse ]; then
        STEP_OPTS=(CONT.NUM_PROMPTS "$PROMPTS" MODEL.MASK_FORMER.CLASS_WEIGHT 10.0
            CONT.BACKBONE_FREEZE True CONT.CLS_HEAD_FREEZE True CONT.MASK_HEAD_FREEZE True
            CONT.PIXEL_DECODER_FREEZE True CONT.QUERY_EMBED_FREEZE True CONT.TRANS_DECODER_FREEZE True
            CONT.PROMPT_MASK_MLP True CONT.PROMPT_NO_OBJ_MLP False CONT.PROMPT_DEEP True CONT.DEEP_CLS True)
        STEP_ITERS=$ITERS; STEP_LR=$LR; STEP_DELTA_OPTS=(CONT.LOGIT_MANI_DELTAS "$TRAIN_DELTAS")
        return 0
    fi
    local dist
    case "$method" in
        ft) dist=() ;;
        mib) dist=(CONT.DIST.UCE True CONT.DIST.UKD True CONT.DIST.KD_WEIGHT 10.0) ;;
        plop) dist=(CONT.DIST.PSEUDO True CONT.DIST.POD_WEIGHT 0.001) ;;
        comformer) dist=(CONT.DIST.PSEUDO True CONT.DIST.KD_WEIGHT 10.0 CONT.DIST.UKD True CONT.DIST.KD_REW True) ;;
        *) die "unknown METHOD=$method: use eclipse, ft, mib, plop or comformer" ;;
    esac
    STEP_OPTS=(CONT.NUM_PROMPTS 0 MODEL.MASK_FORMER.CLASS_WEIGHT 2.0 CONT.DEEP_CLS True "${dist[@]}")
    STEP_ITERS=${BASELINE_ITERS:-$((INC * 400))}; STEP_LR=${BASELINE_LR:-0.00005}
    STEP_DELTA_OPTS=(); EVAL_DELTA_OPTS=(); METHOD_SUFFIX=_$method
}

run_scenario() {
    select_variant
    select_method
    QUERIES=${NUM_QUERIES:-$QUERIES}
    if [ "$VARIANT_DEFAULT" != 1 ]; then  # the released checkpoints are those of the scripts' variant
        STEP0_CKPT=; FINAL_CKPT=
    fi
    if [ "${PRINT_SETTINGS:-0}" = 1 ]; then
        local key
        for key in BENCHMARK CONFIG BASE INC STEPS QUERIES STEP0_ITERS STEP0_LR PROMPTS ITERS LR EVAL_PERIOD TRAIN_DELTAS EVAL_DELTAS STEP0_CKPT; do
            echo "$key=${!key:-}"
        done
        echo "NUM_GPUS=$(count_gpus)"
        echo "IMS_PER_DEVICE=${IMS_PER_DEVICE:-$PER_DEVICE_DEFAULT}"
        echo "VARIANT_OPTS=${VARIANT_OPTS[*]}"
        echo "METHOD=${METHOD:-eclipse}"
        echo "STEP_OPTS=${STEP_OPTS[*]} SOLVER.MAX_ITER $STEP_ITERS SOLVER.BASE_LR $STEP_LR"
        echo "NAME=${NAME:-$DEFAULT_NAME$VARIANT$METHOD_SUFFIX}$([ "${JOINT:-0}" = 1 ] && echo _joint)"
        return 0
    fi
    local python=${PYTHON:-python}
    local data=${DETECTRON2_DATASETS:-datasets}
    [ -d "$data" ] || die "dataset root DETECTRON2_DATASETS=$data does not exist: prepare the datasets as in datasets/README.md and export DETECTRON2_DATASETS=/path/to/datasets"
    export DETECTRON2_DATASETS=$data
    local gpus; gpus=$(count_gpus)
    local name=${NAME:-$DEFAULT_NAME$VARIANT$METHOD_SUFFIX}
    local output_root=${OUTPUT_ROOT:-$DEFAULT_OUTPUT_ROOT}
    local first=${FIRST_STEP:-1} last=${LAST_STEP:-$STEPS}
    local resume=(); [ "${RESUME:-0}" = 1 ] && resume=(--resume)
    local extra=(); [ -n "${EXTRA_ARGS:-}" ] && read -r -a extra <<< "$EXTRA_ARGS"

    local common=(--num-gpus "$gpus" --config-file "$CONFIG" "${VARIANT_OPTS[@]}"
        OUTPUT_DIR "$output_root"
        MODEL.MASK_FORMER.TEST.MASK_BG False MODEL.MASK_FORMER.PER_PIXEL False MODEL.MASK_FORMER.FOCAL True
        CONT.BASE_CLS "$BASE" CONT.INC_CLS "$INC" CONT.MODE "${MODE:-overlap}" SEED 42
        MODEL.MASK_FORMER.NUM_OBJECT_QUERIES "$QUERIES"
        MODEL.MASK_FORMER.DICE_WEIGHT 5.0 MODEL.MASK_FORMER.MASK_WEIGHT 5.0
        MODEL.MASK_FORMER.SOFTMASK False CONT.SOFTCLS False
        SOLVER.MAX_IMS_PER_DEVICE "${IMS_PER_DEVICE:-$PER_DEVICE_DEFAULT}")
    local vpt=("${STEP_OPTS[@]}")

    if [ "${JOINT:-0}" = 1 ]; then  # the joint upper bound replaces the continual steps
        [ "${METHOD:-eclipse}" = eclipse ] || die "JOINT=1 trains the joint upper bound, which has no continual method: unset METHOD (METHOD=$METHOD)"
        echo "== joint upper bound: all $((BASE + STEPS * INC)) classes in one step, evaluated with the $BASE-$INC split"
        "$python" "$REPO_ROOT/train_continual.py" "${common[@]}" "${resume[@]}" \
            MODEL.MASK_FORMER.CLASS_WEIGHT 2.0 CONT.NUM_PROMPTS 0 CONT.DEEP_CLS True CONT.TASK 0 CONT.JOINT True \
            SOLVER.MAX_ITER "${JOINT_ITERS:-$STEP0_ITERS}" SOLVER.BASE_LR "$STEP0_LR" TEST.EVAL_PERIOD "$STEP0_EVAL" \
            SOLVER.CHECKPOINT_PERIOD "$STEP0_EVAL" NAME "${name}_joint" WANDB False "${extra[@]}"
        return 0
    fi

    local step0=${STEP0_WEIGHTS:-$STEP0_CKPT}
    if [ "${RUN_STEP0:-0}" = 1 ]; then
        echo "== step 0: $BASE base classes"
        "$python" "$REPO_ROOT/train_continual.py" "${common[@]}" "${resume[@]}" \
            MODEL.MASK_FORMER.CLASS_WEIGHT 2.0 CONT.NUM_PROMPTS 0 CONT.DEEP_CLS True CONT.TASK 0 \
            SOLVER.MAX_ITER "$STEP0_ITERS" SOLVER.BASE_LR "$STEP0_LR" TEST.EVAL_PERIOD "$STEP0_EVAL" \
            SOLVER.CHECKPOINT_PERIOD "$STEP0_EVAL" NAME "$name" WANDB False "${extra[@]}"
        step0=$(task_output "$python" "$output_root" "$name" 0 "${common[@]}" "${extra[@]}")/model_final.pth
    elif [ "$first" -le 1 ] && [ "$last" -ge 1 ]; then
        [ -n "$step0" ] || die "no released step-0 checkpoint for this variant (BACKBONE=${BACKBONE:-} ORDER=${ORDER:-} CONFIG=$CONFIG): train step 0 here with RUN_STEP0=1, or set STEP0_WEIGHTS=/path/to/step0.pth"
        [ -f "$step0" ] || die "step-0 checkpoint STEP0_WEIGHTS=$step0 not found: download the released $(basename "$STEP0_CKPT") (see README, 'Released checkpoints') and set STEP0_WEIGHTS=/path/to/it, or train step 0 here with RUN_STEP0=1"
    fi

    local t
    for ((t = first; t <= last; t++)); do
        local weights=(); [ "$t" = 1 ] && weights=(CONT.WEIGHTS "$step0")
        echo "== step $t of $STEPS: $INC new classes"
        "$python" "$REPO_ROOT/train_continual.py" "${common[@]}" "${resume[@]}" "${vpt[@]}" \
            CONT.TASK "$t" SOLVER.MAX_ITER "$STEP_ITERS" SOLVER.BASE_LR "$STEP_LR" TEST.EVAL_PERIOD "$EVAL_PERIOD" \
            SOLVER.CHECKPOINT_PERIOD 500000 "${weights[@]}" "${STEP_DELTA_OPTS[@]}" \
            NAME "$name" WANDB False "${extra[@]}"
    done

    if [ "${RUN_EVAL:-1}" = 1 ]; then
        local final=${EVAL_WEIGHTS:-}
        if [ -z "$final" ]; then
            final=$(task_output "$python" "$output_root" "$name" "$STEPS" "${common[@]}" "${extra[@]}")/model_final.pth
        fi
        [ -f "$final" ] || die "final checkpoint $final not found: train all $STEPS steps first, or set EVAL_WEIGHTS${FINAL_CKPT:+ (e.g. the released $(basename "$FINAL_CKPT"))}"
        echo "== evaluation of step $STEPS${EVAL_DELTA_OPTS[*]:+ with deltas $EVAL_DELTAS}"
        "$python" "$REPO_ROOT/train_continual.py" --eval-only "${common[@]}" "${vpt[@]}" \
            CONT.TASK "$STEPS" CONT.WEIGHTS "$final" "${EVAL_DELTA_OPTS[@]}" \
            NAME "$name" WANDB False "${extra[@]}"
    fi
}

# The output folder of step $4 for the given config arguments (asks the config code, so the
# task-name rule lives in one place).
task_output() {
    local python=$1 root=$2 name=$3 step=$4; shift 4
    local args=() skip=0 a
    for a in "$@"; do  # drop --num-gpus N; keep the config file and overrides
        if [ "$skip" = 1 ]; then skip=0; continue; fi
        if [ "$a" = --num-gpus ]; then skip=1; continue; fi
        args+=("$a")
    done
    "$python" -m continual.config output-dir "${args[@]}" OUTPUT_DIR "$root" NAME "$name" CONT.TASK "$step" 2>/dev/null \
        || die "could not derive the output folder of step $step (check CONFIG and EXTRA_ARGS)"
}
