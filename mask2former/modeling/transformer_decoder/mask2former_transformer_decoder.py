"""Mask2Former's masked-attention transformer decoder with the ECLIPSE prompt banks.

Query groups: group 0 is the ``Q0`` base queries (``query_feat`` / ``query_embed``), group
``g >= 1`` is the prompt set of step ``g`` (``prompt_feat[g-1]`` / ``prompt_embed[g-1]``).
Class columns follow :class:`IncrementalClassifier` (step order, no-object last).

Three forward paths:

* training, no prompt set (step 0, or the fine-tuning baseline ``NUM_PROMPTS 0``): all base
  queries, deep supervision on every layer;
* training at step ``t > 0`` with prompts: only the newest prompt set runs through the frozen
  decoder; by default only the pre-decoder prediction is kept as auxiliary output, as in the
  official implementation (``CONT.PROMPT_SUPERVISE_ALL_LAYERS`` supervises every layer);
* inference: base queries and all prompt sets together, self-attention restricted to each
  group by a block-diagonal mask (one call instead of one per group), a mask head per group,
  and the logit manipulation of :mod:`.logit_manipulation` on the class logits.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d
from detectron2.utils.registry import Registry
from fvcore.nn import weight_init
from torch import Tensor, nn

from .classifier import IncrementalClassifier
from .layers import MLP, CrossAttentionLayer, FFNLayer, SelfAttentionLayer, StackedMLPs, mask_logits, resize_bilinear
from .logit_manipulation import manipulate_logits, parse_logit_deltas
from .position_encoding import PositionEmbeddingSine

__all__ = [
    "TRANSFORMER_DECODER_REGISTRY",
    "build_transformer_decoder",
    "MultiScaleMaskedTransformerDecoder",
    "block_diagonal_mask",
    "step_class_groups",
]

TRANSFORMER_DECODER_REGISTRY = Registry("TRANSFORMER_MODULE")
TRANSFORMER_DECODER_REGISTRY.__doc__ = "Registry for the transformer decoder of MaskFormerHead."


def build_transformer_decoder(cfg, in_channels: int, mask_classification: bool = True) -> nn.Module:
    """Build the decoder named by ``cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME``."""
    name = cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME
    return TRANSFORMER_DECODER_REGISTRY.get(name)(cfg, in_channels, mask_classification)


def step_class_groups(base_classes: int, inc_classes: int, step: int) -> List[int]:
    """Class counts per group at ``step``: ``[C0] + step * [Cinc]``."""
    return [base_classes] + [inc_classes] * step


def block_diagonal_mask(sizes: Sequence[int], device=None) -> Optional[Tensor]:
    """Bool [Q, Q] attention mask that lets each query attend only to its own group.

    ``True`` marks a forbidden pair (the convention of :class:`torch.nn.MultiheadAttention`).
    Returns ``None`` for a single group.
    """
    if len(sizes) <= 1:
        return None
    group = torch.repeat_interleave(
        torch.arange(len(sizes), device=device), torch.as_tensor(list(sizes), device=device)
    )
    return group[:, None] != group[None, :]


@TRANSFORMER_DECODER_REGISTRY.register()
class MultiScaleMaskedTransformerDecoder(nn.Module):
    """Masked-attention decoder over 3 feature levels, with ECLIPSE per-step prompt banks.

    State-dict names and registration order are those of the official implementation, so its
    checkpoints load unchanged.
    """

    _version = 2

    # The per-step banks: ModuleLists with one entry per incremental step (index k belongs to
    # step k + 1). With the class head of each step they are the modules `step_modules` lists,
    # which initialisation, freezing and checkpoint validation all read; a new per-step module
    # is a new bank named here (and, if it needs one, a rule in `initialize_step_module`).
    STEP_BANKS: Tuple[str, ...] = ("prompt_feat", "prompt_embed", "prompt_mask_embed", "prompt_no_obj_embed")

    full_intermediate_predictions = False
    """Compute every layer's class logits and full-resolution masks, as the official code does,
    at inference and at a prompt step, instead of only those that are returned;
    :mod:`continual.reference_check` sets it to compare the per-layer class logits.
    The returned outputs are the same (up to float rounding)."""

    @configurable
    def __init__(
        self,
        in_channels: int,
        mask_classification: bool = True,
        *,
        hidden_dim: int,
        num_queries: int,
        nheads: int,
        dim_feedforward: int,
        dec_layers: int,
        pre_norm: bool,
        mask_dim: int,
        enforce_input_project: bool,
        class_groups: Sequence[int],
        num_prompts: int = 0,
        prompt_deep: bool = False,
        prompt_mask_mlp: bool = False,
        prompt_no_obj_mlp: bool = False,
        deep_cls: bool = True,
        cls_bias: bool = True,
        cosine_cls: bool = False,
        logit_deltas: Optional[Sequence[float]] = None,
        prompt_supervise_all_layers: bool = False,
    ):
        """
        Args:
            in_channels: channels of the multi-scale features.
            mask_classification: kept for API compatibility; must be True.
            hidden_dim, num_queries, nheads, dim_feedforward, pre_norm, mask_dim: as in
                Mask2Former; ``num_queries`` is the number of base queries Q0.
            dec_layers: number of decoder layers (``DEC_LAYERS - 1`` in the config).
            enforce_input_project: add a 1x1 projection even when channels match.
            class_groups: classes per group ``[C0, Cinc, ...]``; ``len - 1`` is the step.
            num_prompts: prompts per step P (0: no prompt banks).
            prompt_deep: one positional embedding per decoder layer for each prompt set.
            prompt_mask_mlp: a mask-embedding MLP per prompt set.
            prompt_no_obj_mlp: a no-object MLP per prompt set, used at inference (in training see
                :meth:`_training_no_object_heads`).
            deep_cls, cls_bias, cosine_cls: class-head type, see :class:`IncrementalClassifier`.
            logit_deltas: one delta per group for the inference logit manipulation.
            prompt_supervise_all_layers: at step > 0, return every layer's prediction as
                auxiliary output instead of only the pre-decoder one.
        """
        super().__init__()
        if not mask_classification:
            raise ValueError("MultiScaleMaskedTransformerDecoder only supports mask classification")
        self.mask_classification = True
        self.class_groups = list(class_groups)
        self.num_steps = len(self.class_groups) - 1
        self.num_prompts = num_prompts
        self.prompt_deep = prompt_deep
        self.prompt_supervise_all_layers = prompt_supervise_all_layers
        self.logit_deltas = (
            list(logit_deltas) if logit_deltas is not None else [0.0] * len(self.class_groups)
        )
        if len(self.logit_deltas) != len(self.class_groups):
            raise ValueError(
                f"logit_deltas has {len(self.logit_deltas)} entries for "
                f"{len(self.class_groups)} query groups"
            )

        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.num_heads = nheads
        self.num_layers = dec_layers
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, nheads, dropout=0.0, normalize_before=pre_norm)
            for _ in range(dec_layers)
        )
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, nheads, dropout=0.0, normalize_before=pre_norm)
            for _ in range(dec_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(hidden_dim, dim_feedforward, dropout=0.0, normalize_before=pre_norm)
            for _ in range(dec_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)

        self.num_queries = num_queries
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)

        # one entry per incremental step (index k belongs to step k + 1)
        steps = range(self.num_steps) if num_prompts > 0 else range(0)
        self.prompt_feat = nn.ModuleList(nn.Embedding(num_prompts, hidden_dim) for _ in steps)
        if prompt_deep:
            self.prompt_embed = nn.ModuleList(
                nn.ModuleList(nn.Embedding(num_prompts, hidden_dim) for _ in range(dec_layers))
                for _ in steps
            )
        else:
            self.prompt_embed = nn.ModuleList(nn.Embedding(num_prompts, hidden_dim) for _ in steps)

        self.num_feature_levels = 3
        self.level_embed = nn.Embedding(self.num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(self.num_feature_levels):
            if in_channels != hidden_dim or enforce_input_project:
                proj = Conv2d(in_channels, hidden_dim, kernel_size=1)
                weight_init.c2_xavier_fill(proj)
                self.input_proj.append(proj)
            else:
                self.input_proj.append(nn.Sequential())

        self.class_embed = IncrementalClassifier(
            [1] + self.class_groups, hidden_dim, deep=deep_cls, bias=cls_bias, cosine=cosine_cls
        )
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        self.prompt_mask_embed = nn.ModuleList(
            MLP(hidden_dim, hidden_dim, mask_dim, 3) for _ in (steps if prompt_mask_mlp else ())
        )
        self.prompt_no_obj_embed = nn.ModuleList(
            MLP(hidden_dim, hidden_dim, 1, 3) for _ in (steps if prompt_no_obj_mlp else ())
        )

    @classmethod
    def from_config(cls, cfg, in_channels: int, mask_classification: bool) -> Dict:
        mf, cont = cfg.MODEL.MASK_FORMER, cfg.CONT
        if mf.DEC_LAYERS < 1:
            raise ValueError("MODEL.MASK_FORMER.DEC_LAYERS must be >= 1 (the decoder uses DEC_LAYERS - 1 layers)")
        # with a background class (MASK_BG or PER_PIXEL with semantic inference) the base head
        # has one more output, column 0 = background (order position 0)
        background = bool((mf.TEST.MASK_BG or mf.PER_PIXEL) and mf.TEST.SEMANTIC_ON)
        class_groups = step_class_groups(cont.BASE_CLS + int(background), cont.INC_CLS, cont.TASK)
        return {
            "in_channels": in_channels,
            "mask_classification": mask_classification,
            "hidden_dim": mf.HIDDEN_DIM,
            "num_queries": mf.NUM_OBJECT_QUERIES,
            "nheads": mf.NHEADS,
            "dim_feedforward": mf.DIM_FEEDFORWARD,
            "dec_layers": mf.DEC_LAYERS - 1,
            "pre_norm": mf.PRE_NORM,
            "mask_dim": cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
            "enforce_input_project": mf.ENFORCE_INPUT_PROJ,
            "class_groups": class_groups,
            "num_prompts": cont.NUM_PROMPTS,
            "prompt_deep": cont.PROMPT_DEEP,
            "prompt_mask_mlp": cont.PROMPT_MASK_MLP,
            "prompt_no_obj_mlp": cont.PROMPT_NO_OBJ_MLP,
            "deep_cls": cont.DEEP_CLS,
            "cls_bias": cont.USE_BIAS,
            "cosine_cls": cont.COSINE,
            "logit_deltas": parse_logit_deltas(cont.LOGIT_MANI_DELTAS, len(class_groups)),
            "prompt_supervise_all_layers": cont.PROMPT_SUPERVISE_ALL_LAYERS,
        }

    # ------------------------------------------------------------------ structure helpers
    @property
    def has_prompts(self) -> bool:
        """Whether prompt sets exist (step > 0 with ``NUM_PROMPTS > 0``)."""
        return len(self.prompt_feat) > 0

    @property
    def query_group_sizes(self) -> List[int]:
        """Number of queries of each group at inference: ``[Q0, P, ..., P]``."""
        return [self.num_queries] + [self.num_prompts] * len(self.prompt_feat)

    def step_modules(self, step: int) -> Dict[str, nn.Module]:
        """The modules that belong to ``step`` (>= 1) alone, by name relative to this decoder:
        the entry ``step - 1`` of every non-empty bank of ``STEP_BANKS``, then the class head
        ``class_embed.cls.{step + 1}``. Empty when ``step`` is 0 or beyond the decoder's step."""
        if not 1 <= step <= self.num_steps:
            return {}
        modules = {}
        for bank in self.STEP_BANKS:
            entries = getattr(self, bank)
            if len(entries) >= step:
                modules[f"{bank}.{step - 1}"] = entries[step - 1]
        modules[f"class_embed.cls.{step + 1}"] = self.class_embed.cls[step + 1]
        return modules

    @torch.no_grad()
    def initialize_step_module(self, name: str, module: nn.Module) -> bool:
        """Initialise one module of :meth:`step_modules` from the base model, in place; returns
        whether anything was written (see ``continual.prompt_tuning.initialize_new_step``).

        * ``prompt_feat``: every row = mean of ``query_feat``'s rows;
        * ``prompt_embed`` (each per-layer table when deep): every row = mean of ``query_embed``;
        * ``prompt_mask_embed``: a copy of ``mask_embed``;
        * ``class_embed.cls``: the no-object head ``cls[0]``, its single output row repeated for
          every new class, so every new-class logit starts equal to the no-object logit;
        * ``prompt_no_obj_embed``: kept as constructed (docs/official_behaviours.md#step-initialisation).
        """
        bank = name.rsplit(".", 1)[0]
        if bank == "prompt_feat":
            module.weight.copy_(self.query_feat.weight.mean(0).expand_as(module.weight))
        elif bank == "prompt_embed":
            mean_pos = self.query_embed.weight.mean(0)
            for table in (module if self.prompt_deep else [module]):
                table.weight.copy_(mean_pos.expand_as(table.weight))
        elif bank == "prompt_mask_embed":
            module.load_state_dict(self.mask_embed.state_dict())
        elif bank == "class_embed.cls":
            dst = module.state_dict()
            for key, src in self.class_embed.cls[0].state_dict().items():
                # same-shaped tensors (hidden layers) are copied; the output row is repeated
                dst[key].copy_(src if src.shape == dst[key].shape else src.expand_as(dst[key]))
        else:
            return False
        return True

    def _prompt_pos(self, k: int, layer: int) -> Tensor:
        bank = self.prompt_embed[k]
        return (bank[layer] if self.prompt_deep else bank).weight

    def _mask_heads(self) -> List[nn.Module]:
        """Mask-embedding head of every query group (group 0 first)."""
        prompt_heads = list(self.prompt_mask_embed) or [self.mask_embed] * len(self.prompt_feat)
        return [self.mask_embed] + prompt_heads

    def _inference_mask_heads(self, sizes: Sequence[int]):
        """``(heads, sizes)`` for :meth:`_mask_embeddings` at inference: the prompt groups'
        own mask heads run as one :class:`StackedMLPs` (one batched product per layer instead
        of one per group; stacked once per forward), a shared head over all its queries at
        once. Same embeddings as :meth:`_mask_heads` per group, up to float summation order."""
        heads = self._mask_heads()
        if len(heads) <= 2 or torch.is_grad_enabled():
            return heads, sizes
        if all(h is self.mask_embed for h in heads):
            return [self.mask_embed], [sum(sizes)]
        prompt_sizes = set(sizes[1:])
        if len(prompt_sizes) != 1 or any(h is self.mask_embed for h in heads[1:]):
            return heads, sizes
        return [heads[0], StackedMLPs(heads[1:], prompt_sizes.pop())], [sizes[0], sum(sizes[1:])]

    # ------------------------------------------------------------------ forward
    def forward(self, x: List[Tensor], mask_features: Tensor, mask: Optional[Tensor] = None) -> Dict:
        """
        Args:
            x: 3 multi-scale features [B, C, Hi, Wi] at strides 32, 16, 8.
            mask_features: [B, mask_dim, H/4, W/4] per-pixel embeddings.
            mask: unused (padding is handled by the pixel decoder).
        Returns:
            dict with ``pred_logits`` [B, Q, C+1], ``pred_masks`` [B, Q, H/4, W/4] and, in
            training, ``aux_outputs`` (list of dicts with the same keys).
        """
        memories = self._prepare_memories(x)
        if not self.training:
            return self._forward_inference(memories, mask_features)
        if self.has_prompts:
            return self._forward_prompt_train(memories, mask_features)
        return self._forward_base_train(memories, mask_features)

    def forward_training_layout(self, x: List[Tensor], mask_features: Tensor) -> Dict:
        """The base queries' predictions in the training layout (``pred_logits``, ``pred_masks``
        and every layer's ``aux_outputs``) whatever the mode: the frozen teacher of the
        distillation baselines runs in eval mode but needs them. Only without prompt sets."""
        if self.has_prompts:
            raise ValueError("forward_training_layout is for models without prompt sets (CONT.NUM_PROMPTS 0)")
        return self._forward_base_train(self._prepare_memories(x), mask_features)

    def _prepare_memories(self, x: List[Tensor]) -> List[Tuple[Tensor, Tensor, Tuple[int, int]]]:
        """Per level: (tokens [HW, B, C] with level embedding, sine positions [HW, B, C], (H, W))."""
        if len(x) != self.num_feature_levels:
            raise ValueError(f"expected {self.num_feature_levels} feature levels, got {len(x)}")
        memories = []
        for i, feat in enumerate(x):
            # contiguous [HW, B, C]: the key/value projections of every layer then run as one
            # matrix product; on the permuted view of a batch of 2 or more, torch.matmul
            # falls back to HW small batched products against an expanded weight
            pos = self.pe_layer(feat, None).flatten(2).permute(2, 0, 1).contiguous()
            src = self.input_proj[i](feat).flatten(2) + self.level_embed.weight[i][None, :, None]
            memories.append((src.permute(2, 0, 1).contiguous(), pos, tuple(feat.shape[-2:])))
        return memories

    def _decode(
        self,
        memories,
        mask_features: Tensor,
        queries: Tensor,
        query_pos_per_layer,
        heads,
        self_attn_mask: Optional[Tensor],
        needed: Optional[Sequence[int]] = None,
    ) -> Tuple[List[Tensor], List[Optional[Tensor]], List[Optional[Tensor]]]:
        """Run the decoder layers and the prediction heads before and after every layer.

        Args:
            queries: [Q, B, C] initial query content.
            query_pos_per_layer: callable ``layer -> [Q, B, C]`` positional embedding.
            heads: (mask heads, query sizes) for :meth:`_predict`.
            self_attn_mask: bool [Q, Q] block-diagonal mask or None.
            needed: indices of the predictions (0 = before the first layer) whose class logits
                and full-resolution masks the caller uses; None = all. The others only build
                the next layer's attention mask, at that layer's resolution (see
                :meth:`_attention_mask_low_res`), and come back as None.
        Returns:
            lists (one entry per prediction) of decoder outputs, class logits and mask logits.
        """
        last = self.num_layers
        needed = set(range(last + 1)) if needed is None else set(needed)
        low_res_features: Dict[Tuple[int, int], Tensor] = {}

        def predict(out: Tensor, index: int):
            attn_size = memories[index % self.num_feature_levels][2] if index < last else None
            if index in needed:
                return self._predict(out, mask_features, attn_size, heads)
            return None, None, self._attention_mask_low_res(out, mask_features, attn_size, heads, low_res_features)

        outputs, logits, masks = [], [], []
        cls_, mask_, attn_mask = predict(queries, 0)
        outputs.append(queries), logits.append(cls_), masks.append(mask_)
        output = queries
        for i in range(self.num_layers):
            src, pos, _ = memories[i % self.num_feature_levels]
            query_pos = query_pos_per_layer(i)
            output = self.transformer_cross_attention_layers[i](
                output, src, memory_mask=attn_mask, pos=pos, query_pos=query_pos
            )
            output = self.transformer_self_attention_layers[i](
                output, tgt_mask=self_attn_mask, query_pos=query_pos
            )
            output = self.transformer_ffn_layers[i](output)
            cls_, mask_, attn_mask = predict(output, i + 1)
            outputs.append(output), logits.append(cls_), masks.append(mask_)
        return outputs, logits, masks

    def _mask_embeddings(self, decoded: Tensor, heads) -> Tensor:
        """Mask embeddings [B, Q, mask_dim] of the normed decoder output [B, Q, C], per group."""
        mask_heads, sizes = heads
        if len(mask_heads) == 1:
            return mask_heads[0](decoded)
        chunks = torch.split(decoded, list(sizes), dim=1)
        return torch.cat([head(c) for head, c in zip(mask_heads, chunks)], dim=1)

    def _blocked(self, attn_logits: Tensor) -> Tensor:
        """Mask logits [B, Q, h, w] at the attention resolution -> additive attention mask
        [B*heads, Q, h*w]: ``-inf`` where blocked, 0 elsewhere (what
        :class:`torch.nn.MultiheadAttention` makes of a bool mask, built here once per image
        instead of once per head; with one image the heads share it without a copy)."""
        blocked = attn_logits.detach().sigmoid().flatten(2) < 0.5
        # a query whose mask blocks every location attends everywhere instead
        blocked[blocked.all(-1)] = False
        additive = torch.zeros(blocked.shape, dtype=attn_logits.dtype, device=blocked.device)
        additive.masked_fill_(blocked, float("-inf"))
        return additive.unsqueeze(1).expand(-1, self.num_heads, -1, -1).flatten(0, 1)

    def _predict(self, output: Tensor, mask_features: Tensor, attn_size, heads):
        """Prediction heads on decoder output [Q, B, C].

        Returns class logits [B, Q, C+1], mask logits [B, Q, H, W] and the next layer's
        attention mask, additive [B*heads, Q, h*w] (-inf = blocked, see :meth:`_blocked`), or
        None when ``attn_size`` is None (after the last layer).
        """
        decoded = self.decoder_norm(output).transpose(0, 1)
        class_logits = self.class_embed(decoded)
        if self.training and self.has_prompts and len(self.prompt_no_obj_embed):
            self._training_no_object_heads(class_logits, decoded)
        mask_emb = self._mask_embeddings(decoded, heads)
        masks = mask_logits(mask_emb, mask_features)
        if attn_size is None:
            return class_logits, masks, None
        return class_logits, masks, self._blocked(resize_bilinear(masks, attn_size))

    def _attention_mask_low_res(self, output: Tensor, mask_features: Tensor, attn_size, heads,
                                cache: Dict[Tuple[int, int], Tensor]) -> Optional[Tensor]:
        """The attention mask of :meth:`_predict` without the class logits and without the
        full-resolution masks: bilinear resizing and the mask einsum are both linear maps, so
        the mask features are resized once per attention resolution (kept in ``cache``) and
        the einsum runs at that resolution. Equal to :meth:`_predict`'s mask up to float
        rounding of logits that are within ~1e-6 of the 0.5 threshold."""
        if attn_size is None:
            return None
        with torch.no_grad():  # a bool mask: nothing to back-propagate
            if attn_size not in cache:
                cache[attn_size] = resize_bilinear(mask_features, attn_size)
            decoded = self.decoder_norm(output).transpose(0, 1)
            mask_emb = self._mask_embeddings(decoded, heads)
            return self._blocked(mask_logits(mask_emb, cache[attn_size]))

    def _training_no_object_heads(self, class_logits: Tensor, decoded: Tensor) -> None:
        """The per-step no-object heads in a prompt-tuning forward, as the official code runs them.

        The official training forward writes each head's output into the rows that step's
        prompts would occupy at inference (offset ``Q0 + (k) * P``), although the training
        tensor holds only the P newest prompts. With ``Q0 >= P`` these row ranges are empty: the
        heads change no logit, but they stay in the autograd graph, so the trainable newest head
        gets a gradient of zeros (not None) and AdamW's weight decay still shrinks it.
        """
        rows = decoded.shape[1]
        for k, head in enumerate(self.prompt_no_obj_embed):
            start = min(self.num_queries + k * self.num_prompts, rows)
            stop = min(start + self.num_prompts, rows)
            class_logits[:, start:stop, -1] = head(decoded)[:, start:stop, 0]

    def _forward_base_train(self, memories, mask_features: Tensor) -> Dict:
        bs = mask_features.shape[0]
        queries = self.query_feat.weight.unsqueeze(1).repeat(1, bs, 1)
        query_pos = self.query_embed.weight.unsqueeze(1).repeat(1, bs, 1)
        _, logits, masks = self._decode(
            memories, mask_features, queries, lambda i: query_pos, ([self.mask_embed], [self.num_queries]), None
        )
        return _pack(logits, masks, aux=range(len(logits) - 1))

    def _forward_prompt_train(self, memories, mask_features: Tensor) -> Dict:
        bs = mask_features.shape[0]
        k = len(self.prompt_feat) - 1  # the newest prompt set
        queries = self.prompt_feat[k].weight.unsqueeze(1).repeat(1, bs, 1)
        head = self.prompt_mask_embed[k] if len(self.prompt_mask_embed) else self.mask_embed
        _, logits, masks = self._decode(
            memories,
            mask_features,
            queries,
            lambda i: self._prompt_pos(k, i).unsqueeze(1).repeat(1, bs, 1),
            ([head], [self.num_prompts]),
            None,
            needed=None if self.prompt_supervise_all_layers or self.full_intermediate_predictions
            else [0, self.num_layers],
        )
        # The official implementation keeps only the pre-decoder prediction as auxiliary
        # output at steps > 0 (intermediate layers unsupervised); reproduced by default. The
        # unsupervised layers' predictions are not computed, only their attention masks.
        aux = range(len(logits) - 1) if self.prompt_supervise_all_layers else [0]
        return _pack(logits, masks, aux=aux)

    def _forward_inference(self, memories, mask_features: Tensor) -> Dict:
        bs = mask_features.shape[0]
        sizes = self.query_group_sizes
        content = torch.cat([self.query_feat.weight] + [p.weight for p in self.prompt_feat])
        queries = content.unsqueeze(1).repeat(1, bs, 1)

        def query_pos(i):
            pos = [self.query_embed.weight] + [self._prompt_pos(k, i) for k in range(len(self.prompt_feat))]
            return torch.cat(pos).unsqueeze(1).repeat(1, bs, 1)

        self_mask = block_diagonal_mask(sizes, device=queries.device)
        # only the last prediction is returned: the others just build attention masks
        needed = None if self.full_intermediate_predictions else [self.num_layers]
        outputs, logits, masks = self._decode(
            memories, mask_features, queries, query_pos, self._inference_mask_heads(sizes), self_mask, needed
        )
        pred_logits = logits[-1]
        # Only with prompt sets: at step 0 there are no other groups whose classes a delta
        # could aggregate (a positive delta would turn every base query into foreground).
        if self.has_prompts:
            pred_logits = manipulate_logits(
                pred_logits, sizes, self.class_groups, self.logit_deltas,
                self._prompt_no_object_logits(outputs[-1], sizes),
            )
        return {"pred_logits": pred_logits, "pred_masks": masks[-1]}

    def _prompt_no_object_logits(self, output: Tensor, sizes: Sequence[int]) -> Optional[List[Optional[Tensor]]]:
        if not len(self.prompt_no_obj_embed):
            return None
        chunks = torch.split(self.decoder_norm(output).transpose(0, 1), list(sizes), dim=1)
        return [None] + [head(c) for head, c in zip(self.prompt_no_obj_embed, chunks[1:])]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # checkpoints of version < 2 called the query content "static_query"
        if local_metadata.get("version", None) is None or local_metadata["version"] < 2:
            for key in list(state_dict.keys()):
                if key.startswith(prefix + "static_query"):
                    new_key = prefix + "query_feat" + key[len(prefix + "static_query"):]
                    state_dict[new_key] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def _pack(logits: List[Tensor], masks: List[Tensor], aux: Sequence[int]) -> Dict:
    return {
        "pred_logits": logits[-1],
        "pred_masks": masks[-1],
        "aux_outputs": [{"pred_logits": logits[i], "pred_masks": masks[i]} for i in aux],
    }
