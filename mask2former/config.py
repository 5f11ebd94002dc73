"""Config keys the network reads: Mask2Former's, with the ECLIPSE additions.

Every key and default matches the official implementation (docs/design.md#configuration), so
the official YAML files and command-line overrides are accepted unchanged. This includes the
``CONT.*`` keys that shape the network (class groups of the step, prompt banks, class head,
logit manipulation): they keep their official ``CONT`` names, but are defined here because
the network reads them; :func:`continual.config.add_continual_config` adds the protocol's keys
to the same node.
"""
from detectron2.config import CfgNode as CN

__all__ = ["add_maskformer2_config", "NETWORK_CONT_KEYS"]


def add_maskformer2_config(cfg: CN) -> None:
    """Add the ``MODEL.MASK_FORMER``, ``MODEL.SWIN``, network ``CONT`` and related keys to
    ``cfg`` in place.

    Also adds the DeepLab keys (poly LR schedule, crop constraint, ResNet dilation options)
    that the Mask2Former YAML files use.
    """
    _add_deeplab_keys(cfg)
    _add_network_cont_keys(cfg)

    # data
    cfg.INPUT.DATASET_MAPPER_NAME = "mask_former_semantic"
    cfg.INPUT.COLOR_AUG_SSD = False
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 1.0
    # pad images and segmentation maps in the mapper to this size (-1: no padding)
    cfg.INPUT.SIZE_DIVISIBILITY = -1
    # large-scale jitter (LSJ) augmentation; unused by the ECLIPSE mappers
    cfg.INPUT.IMAGE_SIZE = 1024
    cfg.INPUT.MIN_SCALE = 0.1
    cfg.INPUT.MAX_SCALE = 2.0

    # not in the official code: skip (with a warning) a training sample whose image or
    # annotation cannot be read, instead of stopping the run
    cfg.DATALOADER.SKIP_UNREADABLE_FILES = False

    # solver
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    cfg.SOLVER.HEAD_MULTIPLIER = 1.0  # LR multiplier of predictor.mask_embed (ECLIPSE)

    mf = cfg.MODEL.MASK_FORMER = CN()
    # ECLIPSE / CoMFormer additions
    mf.SOFTMASK = False
    mf.PER_PIXEL = False
    mf.FOCAL = False
    mf.FOCAL_ALPHA = 5.0
    mf.FOCAL_GAMMA = 1.0
    mf.CLASS_WEIGHT_MATCH = -1.0
    mf.DICE_WEIGHT_MATCH = -1.0
    mf.MASK_WEIGHT_MATCH = -1.0
    # loss
    mf.DEEP_SUPERVISION = True
    mf.NO_OBJECT_WEIGHT = 0.1
    mf.CLASS_WEIGHT = 1.0
    mf.DICE_WEIGHT = 1.0
    mf.MASK_WEIGHT = 20.0
    # transformer
    mf.NHEADS = 8
    mf.DROPOUT = 0.1
    mf.DIM_FEEDFORWARD = 2048
    mf.ENC_LAYERS = 0
    mf.DEC_LAYERS = 6  # the decoder uses DEC_LAYERS - 1 layers
    mf.PRE_NORM = False
    mf.HIDDEN_DIM = 256
    mf.NUM_OBJECT_QUERIES = 100
    mf.TRANSFORMER_IN_FEATURE = "res5"
    mf.ENFORCE_INPUT_PROJ = False
    mf.TRANSFORMER_DECODER_NAME = "MultiScaleMaskedTransformerDecoder"
    # inference
    mf.TEST = CN()
    mf.TEST.SEMANTIC_ON = True
    mf.TEST.INSTANCE_ON = False
    mf.TEST.PANOPTIC_ON = False
    mf.TEST.MASK_BG = True  # ECLIPSE: treat label 0 as a real background class
    mf.TEST.OBJECT_MASK_THRESHOLD = 0.0
    mf.TEST.OVERLAP_THRESHOLD = 0.0
    mf.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE = False
    # the backbone input is padded to a multiple of this
    mf.SIZE_DIVISIBILITY = 32
    # point-sampled mask losses
    mf.TRAIN_NUM_POINTS = 112 * 112
    mf.OVERSAMPLE_RATIO = 3.0
    mf.IMPORTANCE_SAMPLE_RATIO = 0.75

    # pixel decoder
    ssh = cfg.MODEL.SEM_SEG_HEAD
    ssh.MASK_DIM = 256
    ssh.TRANSFORMER_ENC_LAYERS = 0
    ssh.PIXEL_DECODER_NAME = "BasePixelDecoder"
    ssh.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = ["res3", "res4", "res5"]
    # kept for compatibility; the pixel decoder uses 4 points and MODEL.MASK_FORMER.NHEADS heads
    ssh.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS = 4
    ssh.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = 8

    # Swin backbone (Swin-T defaults)
    sw = cfg.MODEL.SWIN = CN()
    sw.PRETRAIN_IMG_SIZE = 224
    sw.PATCH_SIZE = 4
    sw.EMBED_DIM = 96
    sw.DEPTHS = [2, 2, 6, 2]
    sw.NUM_HEADS = [3, 6, 12, 24]
    sw.WINDOW_SIZE = 7
    sw.MLP_RATIO = 4.0
    sw.QKV_BIAS = True
    sw.QK_SCALE = None
    sw.DROP_RATE = 0.0
    sw.ATTN_DROP_RATE = 0.0
    sw.DROP_PATH_RATE = 0.3
    sw.APE = False
    sw.PATCH_NORM = True
    sw.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    sw.USE_CHECKPOINT = False


# the CONT keys read by mask2former/ (the rest of CONT belongs to continual/config.py)
NETWORK_CONT_KEYS = (
    "BASE_CLS", "INC_CLS", "TASK", "USE_BIAS", "COSINE", "NUM_PROMPTS", "SOFTCLS", "PROMPT_DEEP",
    "PROMPT_MASK_MLP", "PROMPT_NO_OBJ_MLP", "DEEP_CLS", "LOGIT_MANI_DELTAS", "PROMPT_SUPERVISE_ALL_LAYERS",
)


def _add_network_cont_keys(cfg: CN) -> None:
    c = cfg.CONT = CN()
    # classes of step 0 and of every later step; the step being trained / evaluated
    c.BASE_CLS = 15
    c.INC_CLS = 5
    c.TASK = 0
    c.USE_BIAS = True  # bias of the class heads
    c.COSINE = False  # cosine classifier (bias-free heads, scaled cosine logits)
    c.NUM_PROMPTS = 10  # prompts per incremental step; must be 0 at step 0
    c.SOFTCLS = True  # softmax (True) or sigmoid (False) class scores; the scripts use False
    c.PROMPT_DEEP = False
    c.PROMPT_MASK_MLP = False
    c.PROMPT_NO_OBJ_MLP = False
    c.DEEP_CLS = False
    c.LOGIT_MANI_DELTAS = None  # None, a float, or a list with one delta per query group
    # not in the official code: supervise every decoder layer at steps > 0 (the official
    # code supervises only the pre-decoder prediction and the last layer)
    c.PROMPT_SUPERVISE_ALL_LAYERS = False


def _add_deeplab_keys(cfg: CN) -> None:
    # The same keys as detectron2's DeepLab project (the Mask2Former YAMLs set some of them).
    # Written here so that a Detectron2 install without `detectron2.projects` still works.
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 1.0
    cfg.SOLVER.POLY_LR_POWER = 0.9
    cfg.SOLVER.POLY_LR_CONSTANT_ENDING = 0.0
    ssh = cfg.MODEL.SEM_SEG_HEAD
    ssh.LOSS_TYPE = "hard_pixel_mining"
    ssh.PROJECT_FEATURES = ["res2"]
    ssh.PROJECT_CHANNELS = [48]
    ssh.ASPP_CHANNELS = 256
    ssh.ASPP_DILATIONS = [6, 12, 18]
    ssh.ASPP_DROPOUT = 0.1
    ssh.USE_DEPTHWISE_SEPARABLE_CONV = False
    cfg.MODEL.RESNETS.RES4_DILATION = 1
    cfg.MODEL.RESNETS.RES5_MULTI_GRID = [1, 2, 4]
    cfg.MODEL.RESNETS.STEM_TYPE = "deeplab"
