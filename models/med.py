"""The MED, multimodal mixture of encoder-decoder (BLIP paper §3.1), built from transformers' BLIP blocks.

- ``vision_model``: the ViT (``BlipVisionModel``).
- ``text_encoder``: BERT with cross-attention (``BlipTextModel``); without
  image states it is the unimodal text encoder (ITC, first token ``[CLS]``),
  with them the image-grounded encoder (ITM, first token ``[ENC]``).
- ``text_decoder``: the same stack with causal self-attention and an LM head
  (``BlipTextLMHeadModel``, first token ``[DEC]``). As in BLIP's
  pre-training it shares every parameter with the encoder except the
  self-attention blocks: the embeddings, each layer's cross-attention and
  feed-forward (with their LayerNorms) are the encoder's very module objects,
  and the LM head's output matrix is the shared word embedding.
- ITC: ``vision_proj``/``text_proj`` to 256-d, a learned temperature,
  momentum copies (``*_m``) and feature queues. ITM: ``itm_head``.

The module names are transformers' (``BlipForConditionalGeneration`` /
``BlipForImageTextRetrieval``), so an exported captioner or filter is a
subset of the MED's state dict. A MED built for fewer objectives (the
captioner: LM only; the filter: ITC + ITM) leaves out the parts it does not
use, as the original fine-tuning models do.
"""

from __future__ import annotations

import copy
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import BlipConfig, BlipVisionModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.blip.modeling_blip_text import BlipTextLMHeadModel, BlipTextModel

from capfilt.models import distributed
from capfilt.attention import use_sdpa
from capfilt.models.config import LOSSES, MEDSettings
from capfilt.models.losses import (
    itc_targets, lm_labels, loss_itc, loss_itm, loss_lm, num_lm_targets, sample_hard_negatives,
)
from capfilt.tokenizer import SpecialIds, special_ids

# Parts of each text layer the decoder takes from the encoder (BLIP pre-training ties all but self-attention).
SHARED_LAYER_PARTS = ("crossattention", "intermediate", "output")


def share_encoder_decoder(encoder: BlipTextModel, decoder: BlipTextLMHeadModel) -> None:
    """Make ``decoder`` use ``encoder``'s modules for everything but self-attention (in place)."""
    decoder.bert.embeddings = encoder.embeddings
    for encoder_layer, decoder_layer in zip(encoder.encoder.layer, decoder.bert.encoder.layer, strict=True):
        for name in SHARED_LAYER_PARTS:
            setattr(decoder_layer, name, getattr(encoder_layer, name))
    decoder.cls.predictions.decoder.weight = encoder.embeddings.word_embeddings.weight


def full_precision(device: torch.device):
    """Losses and similarities in float32 even inside a bf16 autocast region (sims are divided by temp 0.07)."""
    return torch.autocast(device.type, enabled=False)


def prompt_length(tokenizer, prompt: str) -> int:
    """Tokens ``[DEC]`` + ``prompt`` occupy at the start of a decoder input (the trailing ``[SEP]`` not counted)."""
    return len(tokenizer(prompt).input_ids) - 1 if prompt else 0


class MED(nn.Module):
    """ViT + text encoder + text decoder; ``forward`` returns the enabled losses (paper §3.2)."""

    def __init__(self, config: BlipConfig, ids: SpecialIds, settings: MEDSettings = MEDSettings()):
        super().__init__()
        text = config.text_config
        if max(ids.pad, ids.cls, ids.sep, ids.dec, ids.enc) >= text.vocab_size:
            raise ValueError(f"special ids {ids} do not fit the text vocabulary of {text.vocab_size}")
        self.config, self.ids, self.settings = config, ids, settings
        self.vision_model = use_sdpa(BlipVisionModel(config.vision_config))  # same maths, fused (capfilt/attention.py)
        if settings.freeze_vision:
            self.vision_model.requires_grad_(False)
        if self.has("itc"):
            self.text_encoder = BlipTextModel(text, add_pooling_layer=False)
            dim = config.image_text_hidden_size
            self.vision_proj = nn.Linear(config.vision_config.hidden_size, dim)
            self.text_proj = nn.Linear(text.hidden_size, dim)
            self.temp = nn.Parameter(torch.tensor(settings.temp_init))
            for name in ("vision_model", "vision_proj", "text_encoder", "text_proj"):
                setattr(self, name + "_m", copy.deepcopy(getattr(self, name)).requires_grad_(False))
            self.register_buffer("image_queue", F.normalize(torch.randn(settings.queue_size, dim), dim=1))
            self.register_buffer("text_queue", F.normalize(torch.randn(settings.queue_size, dim), dim=1))
            self.register_buffer("idx_queue", torch.full((settings.queue_size,), -100, dtype=torch.long))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        if self.has("itm"):
            self.itm_head = nn.Linear(text.hidden_size, 2)
        if self.has("lm"):
            self.text_decoder = BlipTextLMHeadModel(text)
            if self.has("itc"):
                share_encoder_decoder(self.text_encoder, self.text_decoder)

    def has(self, loss: str) -> bool:
        return loss in self.settings.losses

    # --- the three objectives -------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_ids: torch.Tensor | None = None, alpha: float = 0.0,
                generator: torch.Generator | None = None, negative_ids: torch.Tensor | None = None,
                negative_mask: torch.Tensor | None = None,
                has_negative: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Losses for a batch of ``[CLS]``-led captions; ``image_ids`` name the images (same-image positives).

        ``alpha``: ITC soft-target weight (ramped by the trainer); ``generator``:
        the CPU generator ITM's hard-negative draws use (same seed on every rank).
        ``negative_ids``/``negative_mask``/``has_negative``: known-wrong texts
        (``DataConfig.negatives``); where a row has one, ITM pairs its image
        with it instead of with the drawn hard negative text.
        """
        self._check_inputs(pixel_values, input_ids, attention_mask, image_ids)
        image_embeds = self._image_embeds(pixel_values)
        losses = {}
        if self.has("itc"):
            losses["itc"], sim_i2t, sim_t2i, image_ids_all = self._itc(pixel_values, image_embeds, input_ids,
                                                                       attention_mask, image_ids, alpha)
            if self.has("itm"):
                losses["itm"] = self._itm(image_embeds, input_ids, attention_mask, sim_i2t, sim_t2i, image_ids_all,
                                          generator, (negative_ids, negative_mask, has_negative))
        if self.has("lm"):
            losses["lm"] = self._lm(image_embeds, input_ids, attention_mask)
        return losses

    def _image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The ViT's output tokens; with ``freeze_vision``, computed in eval mode and without a graph."""
        if not self.settings.freeze_vision:
            return self.vision_model(pixel_values=pixel_values).last_hidden_state
        with torch.no_grad():
            training = self.vision_model.training
            self.vision_model.eval()
            embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
            self.vision_model.train(training)
        return embeds

    def _itc(self, pixel_values, image_embeds, input_ids, attention_mask, image_ids, alpha):
        """ITC loss, and the global batch's similarities ITM draws its negatives from.

        Those are online features against the momentum features of the batch,
        as in BLIP's pre-training; both directions, ``[B, B]``, on every rank.
        """
        text_embeds = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        image_feat = F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)
        text_feat = F.normalize(self.text_proj(text_embeds[:, 0]), dim=-1)
        with torch.no_grad():
            self.temp.clamp_(self.settings.temp_min, self.settings.temp_max)
            self._momentum_update()
            image_feat_m = F.normalize(self.vision_proj_m(
                self._momentum_image_embeds(pixel_values, image_embeds)[:, 0]), dim=-1).float()
            text_feat_m = F.normalize(self.text_proj_m(
                self.text_encoder_m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]),
                dim=-1).float()
            image_feat_m_all, text_feat_m_all = distributed.gather(image_feat_m), distributed.gather(text_feat_m)
            image_keys = torch.cat([image_feat_m_all, self.image_queue])
            text_keys = torch.cat([text_feat_m_all, self.text_queue])
            image_ids_all = distributed.gather(image_ids) if self.settings.same_image_positives else None
            key_ids = torch.cat([image_ids_all, self.idx_queue]) if image_ids_all is not None else None
            batch = len(input_ids)
            targets = itc_targets(image_ids if image_ids_all is not None else None, key_ids,
                                  offset=distributed.rank() * batch, num_keys=len(image_keys), batch_size=batch,
                                  device=image_keys.device)
        with full_precision(image_keys.device):
            loss = loss_itc(image_feat.float(), text_feat.float(), image_feat_m, text_feat_m, image_keys, text_keys,
                            self.temp, alpha, targets)
        with torch.no_grad(), full_precision(image_keys.device):
            image_feat_all = distributed.gather(image_feat.detach().float())
            text_feat_all = distributed.gather(text_feat.detach().float())
            sim_i2t = image_feat_all @ text_feat_m_all.t() / self.temp
            sim_t2i = text_feat_all @ image_feat_m_all.t() / self.temp
            self._enqueue(image_feat_m_all, text_feat_m_all, image_ids_all)
        return loss, sim_i2t, sim_t2i, image_ids_all

    def _momentum_image_embeds(self, pixel_values: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """The momentum ViT's tokens; the online ViT's own when it is frozen and the momentum ViT equals it.

        A frozen ViT's momentum copy that starts equal (a load without momentum
        weights: every fine-tune from an exported model) stays equal, since a
        step lerps it towards the same weights. Its forward would then repeat
        the online one (in eval mode, as the frozen ViT runs), so it is skipped
        (bench/bench_frozen_vit_step.py measures what that saves).
        """
        if self.settings.freeze_vision and bool(torch.stack([  # one host sync a step, not one per tensor
                (online == momentum).all() for online, momentum in
                zip(self.vision_model.parameters(), self.vision_model_m.parameters(), strict=True)]).all()):
            return image_embeds
        return self.vision_model_m(pixel_values=pixel_values).last_hidden_state

    def _itm(self, image_embeds, input_ids, attention_mask, sim_i2t, sim_t2i, image_ids_all, generator,
             given=(None, None, None)):
        """ITM loss: each pair, its image with a hard negative text, its text with a hard negative image.

        ``given``: (ids, mask, has) of known-wrong texts; a row that has one
        uses it as its image's negative text (compositional negatives, a
        departure from BLIP: capfilt.shapes.negatives). The number of
        negatives, and so ITM's 1:2 balance of classes, stays BLIP's.
        """
        batch, offset = len(input_ids), distributed.rank() * len(input_ids)
        global_batch = len(sim_i2t)
        if image_ids_all is None:
            same_pair = torch.eye(global_batch, dtype=torch.bool)
        else:
            same_pair = (image_ids_all[:, None] == image_ids_all[None, :]).cpu()
        neg_text, neg_image = sample_hard_negatives(sim_i2t.cpu(), sim_t2i.cpu(), same_pair, generator)
        neg_text, neg_image = neg_text[offset:offset + batch], neg_image[offset:offset + batch]

        encoder_ids = input_ids.clone()
        encoder_ids[:, 0] = self.ids.enc
        encoder_ids_all, attention_mask_all = distributed.gather(encoder_ids), distributed.gather(attention_mask)
        image_embeds_all = distributed.gather_with_grad(image_embeds)  # negatives' gradients go home
        neg_text, neg_image = neg_text.to(input_ids.device), neg_image.to(input_ids.device)
        neg_ids, neg_mask = encoder_ids_all[neg_text], attention_mask_all[neg_text]
        given_ids, given_mask, has = given
        if has is not None and bool(has.any()):
            given_ids = given_ids.clone()
            given_ids[:, 0] = self.ids.enc
            has = has.to(input_ids.device)[:, None]
            neg_ids, neg_mask = torch.where(has, given_ids, neg_ids), torch.where(has, given_mask, neg_mask)
        pos = self._grounded_encoder(encoder_ids, attention_mask, image_embeds)
        neg = self._grounded_encoder(  # (text, negative image) pairs, then (negative text, image) pairs
            torch.cat([encoder_ids, neg_ids]),
            torch.cat([attention_mask, neg_mask]),
            torch.cat([image_embeds_all[neg_image], image_embeds]),
        )
        return loss_itm(self.itm_head(pos[:, 0]), self.itm_head(neg[:, 0]))

    def _grounded_encoder(self, input_ids, attention_mask, image_embeds):
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        return self.text_encoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                                 encoder_attention_mask=image_atts).last_hidden_state

    def _lm(self, image_embeds, input_ids, attention_mask):
        """LM loss of the ``[DEC]``-led decoder, averaged over the global batch's target tokens."""
        decoder_ids = input_ids.clone()
        decoder_ids[:, 0] = self.ids.dec
        labels = lm_labels(decoder_ids, self.ids.pad, self.settings.prompt_length)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        logits = self.text_decoder(input_ids=decoder_ids, attention_mask=attention_mask,
                                   encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts).logits
        per_rank_targets = distributed.all_reduce_sum(num_lm_targets(labels)).float() / distributed.world_size()
        with full_precision(logits.device):
            return loss_lm(logits, labels, self.settings.label_smoothing, per_rank_targets.clamp(min=1))

    # --- momentum encoders and queues -----------------------------------------------------
    def momentum_pairs(self):
        return [(getattr(self, name), getattr(self, name + "_m"))
                for name in ("vision_model", "vision_proj", "text_encoder", "text_proj")]

    @torch.no_grad()
    def _momentum_update(self):
        for online, momentum in self.momentum_pairs():
            for param, param_m in zip(online.parameters(), momentum.parameters(), strict=True):
                param_m.lerp_(param.detach(), 1 - self.settings.momentum)

    @torch.no_grad()
    def reset_momentum(self):
        """Momentum encoders := online encoders (at initialisation, as BLIP's ``copy_params``)."""
        for online, momentum in self.momentum_pairs():
            for param, param_m in zip(online.parameters(), momentum.parameters(), strict=True):
                param_m.copy_(param)

    @torch.no_grad()
    def _enqueue(self, image_feat, text_feat, ids):
        start, count = int(self.queue_ptr), len(image_feat)
        if start + count > self.settings.queue_size:
            raise ValueError(f"queue size {self.settings.queue_size} is not a multiple of the global batch {count}")
        self.image_queue[start:start + count] = image_feat
        self.text_queue[start:start + count] = text_feat
        if ids is not None:
            self.idx_queue[start:start + count] = ids
        self.queue_ptr.fill_((start + count) % self.settings.queue_size)

    # --- helpers --------------------------------------------------------------------------
    def enable_gradient_checkpointing(self) -> None:
        """Recompute every transformer layer's activations in backward (non-reentrant: DDP-safe).

        Set on transformers' ``GradientCheckpointingLayer``s directly: ``BlipTextModel``
        does not offer ``activation_checkpointing_enable`` although its layers support it.
        """
        for name in ("vision_model", "text_encoder", "text_decoder"):
            for module in getattr(self, name).modules() if hasattr(self, name) else ():
                if isinstance(module, GradientCheckpointingLayer):
                    module.gradient_checkpointing = True
                    module._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)

    def _check_inputs(self, pixel_values, input_ids, attention_mask, image_ids):
        size = self.config.vision_config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(f"pixel_values must be [batch, 3, {size}, {size}], got {tuple(pixel_values.shape)}")
        if input_ids.shape != attention_mask.shape or len(input_ids) != len(pixel_values):
            raise ValueError(f"input_ids {tuple(input_ids.shape)}, attention_mask {tuple(attention_mask.shape)} "
                             f"and pixel_values {tuple(pixel_values.shape)} disagree")
        if not bool((input_ids[:, 0] == self.ids.cls).all()):
            raise ValueError(f"captions must start with [CLS] (id {self.ids.cls}); the MED sets [ENC]/[DEC] itself")
        if self.settings.same_image_positives and self.has("itc") and image_ids is None:
            raise ValueError("same_image_positives needs image_ids")


def sincos_positions(grid: int, dim: int) -> torch.Tensor:
    """2-D sine-cosine position embeddings ``[grid * grid, dim]``, rows in patch order (row by row).

    As in MAE (He et al., 2022, following the Transformer's 1-D ones): half of
    ``dim`` encodes the patch row, half its column, each as sines and cosines
    at ``dim / 4`` frequencies from 1 down to 1/10000.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos positions need a width divisible by 4, got {dim}")
    frequencies = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    rows, columns = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                                   indexing="ij")
    parts = []
    for coordinate in (rows.flatten(), columns.flatten()):
        angles = coordinate[:, None] * frequencies[None, :]
        parts += [torch.sin(angles), torch.cos(angles)]
    return torch.cat(parts, dim=1)


@torch.no_grad()
def start_positions_at_sincos(vision_model: BlipVisionModel) -> None:
    """Set a ViT's learned position embeddings to ``sincos_positions`` (class token: zero); they stay trainable."""
    embeddings = vision_model.embeddings
    table = embeddings.position_embedding
    table[0, 0] = 0
    table[0, 1:] = sincos_positions(int(round(embeddings.num_patches ** 0.5)), table.shape[-1]).to(table.dtype)


def init_sincos_positions(med: MED) -> None:
    """Start the MED's ViT (and the momentum ViT) at ``sincos_positions`` instead of BLIP's truncated normal.

    capfilt's option, not BLIP's (BLIP's start is a truncated normal, std
    0.02, from which a small ViT trained from scratch learns positions
    slowly); the demo GPU recipe starts from it (``vision_position_init``).
    """
    for name in ("vision_model", "vision_model_m"):
        if hasattr(med, name):
            start_positions_at_sincos(getattr(med, name))


def build_med(config: BlipConfig, tokenizer, settings: MEDSettings = MEDSettings()) -> MED:
    """A MED with random weights for ``config`` (e.g. ``preset_config("base", tokenizer=tok)``)."""
    if len(tokenizer) != config.text_config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} ids but the config's vocabulary is "
                         f"{config.text_config.vocab_size}; build the config with preset_config(..., tokenizer=)")
    return MED(config, special_ids(tokenizer), settings)
