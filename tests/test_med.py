"""The MED (capfilt.models.med) and its losses (capfilt.models.losses) against direct computations."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from capfilt.models.data import Batch, longest_text, trim_padding
from capfilt.models.losses import itc_targets, loss_itc, loss_lm, sample_hard_negatives
from capfilt.models.med import MED, MEDSettings, build_med, init_sincos_positions, prompt_length, sincos_positions
from capfilt.tokenizer import special_ids

CAPTIONS = ["a red square", "a small green circle", "a blue triangle left of a dog", "a picture of a cat"]



@pytest.fixture
def med(tiny_config, tokenizer):
    torch.manual_seed(0)
    return build_med(tiny_config, tokenizer, MEDSettings(queue_size=8))


@pytest.fixture
def batch(tokenizer, tiny_config):
    size = tiny_config.vision_config.image_size
    tokens = tokenizer(CAPTIONS, padding="max_length", max_length=12, truncation=True, return_tensors="pt")
    pixels = torch.randn(len(CAPTIONS), 3, size, size, generator=torch.Generator().manual_seed(3))
    return pixels, tokens.input_ids, tokens.attention_mask


def _decoder_vs_encoder(med: MED):
    encoder = dict(med.text_encoder.named_parameters(remove_duplicate=False))
    for name, param in med.text_decoder.bert.named_parameters(remove_duplicate=False):
        yield name, param, encoder[name]


def test_decoder_shares_everything_but_self_attention(med, batch):
    names = [name for name, _, _ in _decoder_vs_encoder(med)]
    assert any(".crossattention." in n for n in names) and any(".intermediate." in n for n in names)
    optimizer = torch.optim.AdamW(med.parameters(), lr=1e-2)
    for _ in range(2):  # before and after an optimizer step
        for name, decoder_param, encoder_param in _decoder_vs_encoder(med):
            self_attention = ".attention." in name
            assert (decoder_param is encoder_param) != self_attention, name
            if self_attention:  # separate storage
                assert decoder_param.data_ptr() != encoder_param.data_ptr(), name
        word_embeddings = med.text_encoder.embeddings.word_embeddings.weight
        assert med.text_decoder.cls.predictions.decoder.weight is word_embeddings
        before = word_embeddings.detach().clone()
        losses = med(*batch, alpha=0.4, generator=torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        assert not torch.equal(before, word_embeddings)  # the step did move the shared weights


def test_roles_build_only_their_parts(tiny_config, tokenizer):
    captioner = build_med(tiny_config, tokenizer, MEDSettings(losses=("lm",)))
    assert not hasattr(captioner, "text_encoder") and not hasattr(captioner, "itm_head")
    filter_ = build_med(tiny_config, tokenizer, MEDSettings(losses=("itc", "itm"), queue_size=4))
    assert not hasattr(filter_, "text_decoder") and hasattr(filter_, "vision_model_m")
    with pytest.raises(ValueError, match="needs 'itc'"):
        MEDSettings(losses=("itm", "lm"))
    assert prompt_length(tokenizer, "a picture of ") == 4  # [DEC] a picture of


def _direct_itc(image_feat, text_feat, image_feat_m, text_feat_m, image_keys, text_keys, temp, alpha, targets):
    """ITC written out row by row: -sum_j q_ij log p_ij with p a softmax, q the mixed targets."""
    total = 0.0
    for queries, queries_m, keys in ((image_feat, image_feat_m, text_keys), (text_feat, text_feat_m, image_keys)):
        for i in range(len(queries)):
            logits = [float(queries[i] @ keys[j]) / temp for j in range(len(keys))]
            logits_m = [float(queries_m[i] @ keys[j]) / temp for j in range(len(keys))]
            norm, norm_m = math.log(sum(math.exp(v) for v in logits)), sum(math.exp(v) for v in logits_m)
            for j in range(len(keys)):
                soft = alpha * math.exp(logits_m[j]) / norm_m + (1 - alpha) * float(targets[i, j])
                total -= soft * (logits[j] - norm) / len(queries) / 2
    return total


def test_loss_itc_matches_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    feats = [F.normalize(torch.randn(3, 5, generator=g), dim=1) for _ in range(4)]
    queue = [F.normalize(torch.randn(4, 5, generator=g), dim=1) for _ in range(2)]
    image_keys, text_keys = torch.cat([feats[2], queue[0]]), torch.cat([feats[3], queue[1]])
    targets = itc_targets(None, None, offset=0, num_keys=7, batch_size=3)
    got = loss_itc(*feats, image_keys, text_keys, torch.tensor(0.07), 0.4, targets)
    want = _direct_itc(*feats, image_keys, text_keys, 0.07, 0.4, targets)
    assert got.item() == pytest.approx(want, rel=1e-5)
    # Same-image positives: rows 0 and 2 show one image, so each is the other's positive too.
    ids = torch.tensor([5, 6, 5])
    targets = itc_targets(ids, torch.cat([ids, torch.full((4,), -100)]), offset=0, num_keys=7, batch_size=3)
    assert targets[0, :3].tolist() == [0.5, 0.0, 0.5] and targets[1, :3].tolist() == [0.0, 1.0, 0.0]


def _features(med, pixels, input_ids, attention_mask):
    image_embeds = med.vision_model(pixel_values=pixels).last_hidden_state
    text_embeds = med.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    image_feat = F.normalize(med.vision_proj(image_embeds[:, 0]), dim=-1)
    text_feat = F.normalize(med.text_proj(text_embeds[:, 0]), dim=-1)
    return image_embeds, image_feat, text_feat


def test_med_itc_uses_momentum_features_and_queue(med, batch):
    queue_images, queue_texts = med.image_queue.clone(), med.text_queue.clone()
    losses = med(*batch, alpha=0.4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # momentum encoders start as copies, so an update leaves them equal to the online ones
        _, image_feat, text_feat = _features(med, *batch)
    keys_i, keys_t = torch.cat([image_feat, queue_images]), torch.cat([text_feat, queue_texts])
    targets = itc_targets(None, None, 0, len(keys_i), len(image_feat))
    want = _direct_itc(image_feat, text_feat, image_feat, text_feat, keys_i, keys_t, 0.07, 0.4, targets)
    assert losses["itc"].item() == pytest.approx(want, rel=1e-4)
    assert torch.allclose(med.image_queue[:4], image_feat, atol=1e-6) and int(med.queue_ptr) == 4
    assert torch.equal(med.image_queue[4:], queue_images[4:])


def _direct_itm(med, batch, tokenizer, given=None) -> float:
    """BLIP's ITM loss computed pair by pair; ``given``: (ids, mask, has) of known-wrong texts per image."""
    pixels, input_ids, attention_mask = batch
    enc = special_ids(tokenizer).enc
    with torch.no_grad():
        image_embeds, image_feat, text_feat = _features(med, *batch)
        # Hard negatives: softmaxed similarity (+1e-4), own pair excluded, drawn with the same generator.
        generator = torch.Generator().manual_seed(7)
        eye = torch.eye(len(input_ids), dtype=torch.bool)
        w_i2t = (torch.exp(image_feat @ text_feat.t() / 0.07) / torch.exp(image_feat @ text_feat.t() / 0.07).sum(1,
                 keepdim=True) + 1e-4).masked_fill(eye, 0)
        w_t2i = (torch.exp(text_feat @ image_feat.t() / 0.07) / torch.exp(text_feat @ image_feat.t() / 0.07).sum(1,
                 keepdim=True) + 1e-4).masked_fill(eye, 0)
        neg_text = torch.multinomial(w_i2t, 1, generator=generator).squeeze(1)
        neg_image = torch.multinomial(w_t2i, 1, generator=generator).squeeze(1)
        ids = input_ids.clone()
        ids[:, 0] = enc
        texts = [(ids[i], attention_mask[i]) for i in range(4)]
        negative_texts = [texts[neg_text[i]] for i in range(4)]
        if given is not None:
            given_ids, given_mask, has = given
            given_ids = given_ids.clone()
            given_ids[:, 0] = enc
            negative_texts = [(given_ids[i], given_mask[i]) if has[i] else negative_texts[i] for i in range(4)]
        pairs = [(texts[i], i, 1) for i in range(4)] + [(texts[i], neg_image[i], 0) for i in range(4)] + \
                [(negative_texts[i], i, 0) for i in range(4)]
        total = 0.0
        for (text_ids, mask), image, label in pairs:
            out = med.text_encoder(input_ids=text_ids[None], attention_mask=mask[None],
                                   encoder_hidden_states=image_embeds[image:image + 1]).last_hidden_state
            logits = med.itm_head(out[0, 0])
            total -= float(logits[label] - torch.logsumexp(logits, 0))
    return total / len(pairs)


def test_med_itm_matches_a_direct_computation(med, batch, tokenizer):
    losses = med(*batch, alpha=0.4, generator=torch.Generator().manual_seed(7))
    assert losses["itm"].item() == pytest.approx(_direct_itm(med, batch, tokenizer), rel=1e-4)


def test_med_itm_pairs_images_with_their_given_negative_texts(med, batch, tokenizer):
    """Rows with a known-wrong text (DataConfig.negatives) use it instead of the drawn hard negative text."""
    tokens = tokenizer(["a large red square", "", "a blue dog left of a triangle", ""], padding="max_length",
                       max_length=12, truncation=True, return_tensors="pt")
    given = (tokens.input_ids, tokens.attention_mask, torch.tensor([True, False, True, False]))
    state = {k: v.clone() for k, v in med.state_dict().items()}  # the same queues and momentum for both runs
    plain = med(*batch, alpha=0.4, generator=torch.Generator().manual_seed(7))["itm"].item()
    med.load_state_dict(state)
    losses = med(*batch, alpha=0.4, generator=torch.Generator().manual_seed(7), negative_ids=given[0],
                 negative_mask=given[1], has_negative=given[2])
    assert losses["itm"].item() == pytest.approx(_direct_itm(med, batch, tokenizer, given), rel=1e-4)
    assert abs(losses["itm"].item() - plain) > 1e-4


def test_sample_hard_negatives_never_draws_the_same_image():
    sim = torch.zeros(4, 4)
    same = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)
    for seed in range(5):
        neg_text, neg_image = sample_hard_negatives(sim, sim, same, torch.Generator().manual_seed(seed))
        assert not same[torch.arange(4), neg_text].any() and not same[torch.arange(4), neg_image].any()
    with pytest.raises(ValueError, match="two different images"):
        sample_hard_negatives(sim, sim, torch.ones(4, 4, dtype=torch.bool))


def _direct_lm(logits, labels, smoothing):
    """Label-smoothed next-token cross-entropy, written out: (1-e)(-log p_y) + e * mean_v(-log p_v)."""
    log_probs = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    targets = labels[:, 1:]
    total, count = 0.0, 0
    for b in range(targets.shape[0]):
        for t in range(targets.shape[1]):
            if targets[b, t] == -100:
                continue
            nll, uniform = -float(log_probs[b, t, targets[b, t]]), -float(log_probs[b, t].mean())
            total += (1 - smoothing) * nll + smoothing * uniform
            count += 1
    return total / count


@pytest.mark.parametrize("prompt", ["", "a picture of "])
def test_med_lm_matches_a_direct_computation(tiny_config, tokenizer, batch, prompt):
    pixels, _, _ = batch
    settings = MEDSettings(losses=("lm",), prompt_length=prompt_length(tokenizer, prompt))
    torch.manual_seed(0)
    med = build_med(tiny_config, tokenizer, settings)
    tokens = tokenizer([prompt + c for c in CAPTIONS], padding="max_length", max_length=14, return_tensors="pt")
    loss = med(pixels, tokens.input_ids, tokens.attention_mask)["lm"]
    ids = special_ids(tokenizer)
    decoder_ids = tokens.input_ids.clone()
    decoder_ids[:, 0] = ids.dec
    labels = decoder_ids.masked_fill(tokens.attention_mask == 0, -100)
    labels[:, :settings.prompt_length] = -100
    with torch.no_grad():
        image_embeds = med.vision_model(pixel_values=pixels).last_hidden_state
        logits = med.text_decoder(input_ids=decoder_ids, attention_mask=tokens.attention_mask,
                                  encoder_hidden_states=image_embeds).logits
    assert loss.item() == pytest.approx(_direct_lm(logits, labels, 0.1), rel=1e-5)
    assert loss_lm(logits, labels, 0.0).item() == pytest.approx(_direct_lm(logits, labels, 0.0), rel=1e-5)


def test_forward_rejects_bad_input(med, batch):
    pixels, input_ids, attention_mask = batch
    with pytest.raises(ValueError, match=r"start with \[CLS\]"):
        med(pixels, input_ids[:, 1:], attention_mask[:, 1:])
    with pytest.raises(ValueError, match="pixel_values"):
        med(pixels[:, :, :16], input_ids, attention_mask)


def test_sincos_positions_encode_row_and_column():
    """Each patch's vector, written out from MAE's formula: sin/cos of its row, then of its column."""
    grid, dim = 4, 16
    table = sincos_positions(grid, dim)
    assert table.shape == (grid * grid, dim)
    quarter = dim // 4
    for row in range(grid):
        for column in range(grid):
            expected = []
            for coordinate in (row, column):
                expected += [math.sin(coordinate / 10000 ** (k / quarter)) for k in range(quarter)]
                expected += [math.cos(coordinate / 10000 ** (k / quarter)) for k in range(quarter)]
            assert torch.allclose(table[row * grid + column], torch.tensor(expected), atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_positions(grid, 18)


def test_sincos_init_sets_the_vit_and_its_momentum_copy(med, batch):
    init_sincos_positions(med)
    grid = med.config.vision_config.image_size // med.config.vision_config.patch_size
    for vit in (med.vision_model, med.vision_model_m):
        table = vit.embeddings.position_embedding
        assert table.requires_grad == (vit is med.vision_model)  # the momentum copy is never trained
        assert torch.equal(table[0, 0], torch.zeros_like(table[0, 0]))
        assert torch.allclose(table[0, 1:], sincos_positions(grid, table.shape[-1]))
    losses = med(*batch)
    sum(losses.values()).backward()
    assert med.vision_model.embeddings.position_embedding.grad.abs().sum() > 0  # still trained


def test_a_frozen_vit_equal_to_its_momentum_copy_runs_once(tiny_config, tokenizer, batch):
    torch.manual_seed(0)
    fast = build_med(tiny_config, tokenizer, MEDSettings(queue_size=8, freeze_vision=True))
    slow = copy.deepcopy(fast)
    slow._momentum_image_embeds = lambda pixels, _: slow.vision_model_m.eval()(pixel_values=pixels).last_hidden_state
    calls = []
    fast.vision_model_m.register_forward_hook(lambda *_: calls.append(1))
    for _ in range(2):  # the second step after a momentum update, which leaves the copy equal
        got = fast(*batch, alpha=0.4, generator=torch.Generator().manual_seed(0))
        want = slow(*batch, alpha=0.4, generator=torch.Generator().manual_seed(0))
        assert got["itc"].item() == pytest.approx(want["itc"].item(), rel=1e-5)
        assert got["itm"].item() == pytest.approx(want["itm"].item(), rel=1e-5)
    assert calls == []
    with torch.no_grad():  # a momentum ViT that differs (a resumed pre-training) runs its own forward
        next(fast.vision_model_m.parameters()).add_(0.01)
    fast(*batch, alpha=0.4, generator=torch.Generator().manual_seed(0))
    assert calls == [1]


def test_trimmed_padding_changes_no_loss(med, tokenizer, tiny_config):
    """Cutting the columns every text pads (capfilt.models.data.trim_padding) gives the losses and gradients of
    the batch padded to max_tokens (the trainer cuts every batch before its step)."""
    size = tiny_config.vision_config.image_size
    padded = dict(padding="max_length", max_length=24, truncation=True, return_tensors="pt")
    tokens = tokenizer(CAPTIONS, **padded)
    negatives = tokenizer(["a large red square left of a small blue circle", "", "a dog", ""], **padded)
    batch = Batch(pixel_values=torch.randn(len(CAPTIONS), 3, size, size, generator=torch.Generator().manual_seed(3)),
                  input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, image_ids=torch.arange(4),
                  negative_ids=negatives.input_ids, negative_mask=negatives.attention_mask,
                  has_negative=torch.tensor([True, False, True, False]))
    trimmed = trim_padding(batch)
    longest = int(negatives.attention_mask.sum(1).max())  # the negative is the longest text
    assert longest == longest_text(batch) < 24
    assert trimmed.input_ids.shape[1] == trimmed.negative_mask.shape[1] == longest
    assert torch.equal(trimmed.input_ids, tokens.input_ids[:, :longest]) and batch.input_ids.shape[1] == 24

    state = {k: v.clone() for k, v in med.state_dict().items()}  # the same queues and momentum for both runs
    med.eval()  # no dropout: the two runs draw nothing at random but ITM's negatives (same generator)
    results = []
    for each in (batch, trimmed):
        med.load_state_dict(state)
        med.zero_grad()
        losses = med(each.pixel_values, each.input_ids, each.attention_mask, image_ids=each.image_ids, alpha=0.4,
                     generator=torch.Generator().manual_seed(7), negative_ids=each.negative_ids,
                     negative_mask=each.negative_mask, has_negative=each.has_negative)
        sum(losses.values()).backward()
        grads = {n: p.grad.clone() for n, p in med.named_parameters() if p.grad is not None}
        results.append(({k: v.item() for k, v in losses.items()}, grads))
    (full_losses, full_grads), (cut_losses, cut_grads) = results
    assert set(full_losses) == {"itc", "itm", "lm"}
    for name in full_losses:
        assert cut_losses[name] == pytest.approx(full_losses[name], rel=1e-5, abs=1e-6), name
    assert full_grads.keys() == cut_grads.keys()
    for name in full_grads:
        assert torch.allclose(cut_grads[name], full_grads[name], rtol=1e-4, atol=1e-6), name
