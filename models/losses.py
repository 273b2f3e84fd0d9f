"""The MED's three pre-training objectives (BLIP paper §3.2), as plain functions on tensors.

- ITC, image-text contrastive: [CLS] features of the unimodal encoders, with
  momentum-distilled soft targets (ALBEF's momentum distillation, which BLIP
  follows) against a queue of momentum features.
- ITM, image-text matching: a binary head on the image-grounded encoder's
  [ENC] output; positives plus one hard negative text and one hard negative
  image per pair, sampled by contrastive similarity.
- LM, language modelling: the image-grounded decoder's next-token
  cross-entropy with label smoothing 0.1.

Nothing here knows about modules or ranks; ``capfilt.models.med`` feeds these
with the right tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # cross_entropy's default ignore_index: pads and prompt tokens


def itc_targets(query_ids: torch.Tensor | None, key_ids: torch.Tensor | None, offset: int, num_keys: int,
                batch_size: int, device: torch.device | None = None) -> torch.Tensor:
    """Ground-truth ITC distribution ``[batch, num_keys]`` over the keys (global batch, then queue).

    Without ids the positive of row ``i`` is key ``offset + i`` (its own pair:
    pre-training). With ids, every key of the same image is a positive,
    weighted equally (retrieval fine-tuning, where an image has several captions).
    """
    if query_ids is None:
        targets = torch.zeros(batch_size, num_keys, device=device)
        rows = torch.arange(batch_size, device=device)
        targets[rows, offset + rows] = 1.0
        return targets
    positives = (query_ids[:, None] == key_ids[None, :]).float()
    return positives / positives.sum(1, keepdim=True)


def loss_itc(image_feat: torch.Tensor, text_feat: torch.Tensor, image_feat_m: torch.Tensor,
             text_feat_m: torch.Tensor, image_keys: torch.Tensor, text_keys: torch.Tensor,
             temp: torch.Tensor, alpha: float, targets: torch.Tensor) -> torch.Tensor:
    """ITC with momentum distillation.

    ``image_feat``/``text_feat`` ``[b, d]``: the online, L2-normalised [CLS]
    projections (they carry the gradient). ``image_feat_m``/``text_feat_m``
    ``[b, d]``: the momentum encoders' features of the same pairs.
    ``image_keys``/``text_keys`` ``[K, d]``: momentum features of the global
    batch followed by the queue. Soft targets: ``alpha`` times the momentum
    model's softmaxed similarities plus ``1 - alpha`` times ``targets``.
    """
    sim_i2t = image_feat @ text_keys.t() / temp
    sim_t2i = text_feat @ image_keys.t() / temp
    with torch.no_grad():
        targets_i2t = alpha * F.softmax(image_feat_m @ text_keys.t() / temp, dim=1) + (1 - alpha) * targets
        targets_t2i = alpha * F.softmax(text_feat_m @ image_keys.t() / temp, dim=1) + (1 - alpha) * targets
    loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * targets_i2t).sum(1).mean()
    loss_t2i = -(F.log_softmax(sim_t2i, dim=1) * targets_t2i).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2


def sample_hard_negatives(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, same_pair: torch.Tensor,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One hard negative text per image and one hard negative image per text (paper §3.2, ITM).

    ``sim_i2t``/``sim_t2i`` ``[B, B]``: contrastive similarities within the
    global batch. Candidates are drawn in proportion to the softmaxed
    similarity, plus a 1e-4 floor so that no candidate underflows to zero;
    ``same_pair`` (the diagonal, or every pair of the same image) is never
    drawn. Returns (negative text index per image, negative image index per text).
    """
    with torch.no_grad():
        weights_i2t = (F.softmax(sim_i2t.float(), dim=1) + 1e-4).masked_fill(same_pair, 0)
        weights_t2i = (F.softmax(sim_t2i.float(), dim=1) + 1e-4).masked_fill(same_pair, 0)
        if same_pair.all(1).any():
            raise ValueError("ITM needs at least two different images in the global batch to draw a negative")
        neg_text = torch.multinomial(weights_i2t, 1, generator=generator).squeeze(1)
        neg_image = torch.multinomial(weights_t2i, 1, generator=generator).squeeze(1)
    return neg_text, neg_image


def loss_itm(itm_logits_pos: torch.Tensor, itm_logits_neg: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the 2-way ITM head: matched pairs are class 1, negatives class 0."""
    logits = torch.cat([itm_logits_pos, itm_logits_neg])
    labels = torch.cat([torch.ones(len(itm_logits_pos)), torch.zeros(len(itm_logits_neg))]).long()
    return F.cross_entropy(logits.float(), labels.to(logits.device))


def lm_labels(decoder_input_ids: torch.Tensor, pad_id: int, prompt_length: int = 0) -> torch.Tensor:
    """Decoder targets: the input ids, with pads and the first ``prompt_length`` tokens ignored.

    ``prompt_length`` covers ``[DEC]`` and the prompt's words (``a picture of``
    is 3 words, so 4): the captioner is not trained to write its prompt.
    """
    labels = decoder_input_ids.masked_fill(decoder_input_ids == pad_id, IGNORE_INDEX)
    labels[:, :prompt_length] = IGNORE_INDEX
    return labels


def num_lm_targets(labels: torch.Tensor) -> torch.Tensor:
    """How many next-token targets ``labels`` holds (positions 1.. that are not ignored)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def loss_lm(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.1,
            num_targets: torch.Tensor | int | None = None) -> torch.Tensor:
    """Next-token cross-entropy with label smoothing, averaged over the target tokens.

    ``logits`` ``[b, L, V]`` predict position ``t + 1`` from position ``t``.
    ``num_targets`` is the divisor (default: this batch's target count); the
    trainer passes the global count over the world size so that the mean is
    the global batch's mean whatever the number of processes.
    """
    targets = labels[:, 1:]
    total = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                            ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing, reduction="sum")
    if num_targets is None:
        num_targets = num_lm_targets(labels)
    return total / num_targets
