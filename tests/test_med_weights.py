"""Initialising a MED from transformers folders and original checkpoints (capfilt.models.weights)."""

from __future__ import annotations

import pytest
import torch

from capfilt.checkpoints import CheckpointError, hf_to_original
from capfilt.models.med import MEDSettings, build_med
from capfilt.models.weights import load_med_weights, resize_position_embedding



def _same(model, med, prefixes):
    mine = med.state_dict()
    return all(torch.equal(v, mine[k]) for k, v in model.state_dict().items() if k.startswith(prefixes))


def test_captioner_and_filter_folders_initialise_their_roles(tmp_path, tiny_config, tokenizer, hf_captioner,
                                                             hf_retrieval):
    hf_captioner.save_pretrained(tmp_path / "captioner")
    hf_retrieval.save_pretrained(tmp_path / "filter")
    captioner = build_med(tiny_config, tokenizer, MEDSettings(losses=("lm",)))
    load_med_weights(captioner, tmp_path / "captioner")
    assert _same(hf_captioner, captioner, ("vision_model.", "text_decoder."))
    filter_ = build_med(tiny_config, tokenizer, MEDSettings(losses=("itc", "itm"), queue_size=4))
    load_med_weights(filter_, tmp_path / "filter")
    assert _same(hf_retrieval, filter_, ("vision_model.", "text_encoder.", "vision_proj.", "itm_head."))
    assert torch.equal(filter_.vision_model_m.embeddings.patch_embedding.weight,
                       filter_.vision_model.embeddings.patch_embedding.weight)  # momentum starts as a copy
    full = build_med(tiny_config, tokenizer, MEDSettings(queue_size=4))
    with pytest.raises(CheckpointError, match="missing"):  # a captioner has no ITC/ITM parts
        load_med_weights(full, tmp_path / "captioner")


def test_original_checkpoint_initialises_a_med(tmp_path, tiny_config, tokenizer):
    torch.manual_seed(0)
    source = build_med(tiny_config, tokenizer, MEDSettings(queue_size=4))
    with torch.no_grad():
        source.temp.fill_(0.05)
    torch.save({"model": hf_to_original(source.state_dict())}, tmp_path / "model_base.pth")
    torch.manual_seed(1)
    med = build_med(tiny_config, tokenizer, MEDSettings(queue_size=4))
    load_med_weights(med, tmp_path / "model_base.pth")
    online = [k for k in source.state_dict() if "_m." not in k and "queue" not in k and k != "queue_ptr"]
    assert all(torch.equal(source.state_dict()[k], med.state_dict()[k]) for k in online)
    assert med.temp.item() == pytest.approx(0.05)


def test_bad_sources_are_clear_errors(tmp_path, tiny_config, tokenizer):
    med = build_med(tiny_config, tokenizer, MEDSettings(losses=("lm",)))
    with pytest.raises(CheckpointError, match="no weights"):
        load_med_weights(med, tmp_path / "nothing")
    torch.save({"model": {"visual_encoder.cls_token": torch.zeros(1, 1, 32), "bogus.weight": torch.zeros(1)}},
               tmp_path / "bad.pth")
    with pytest.raises(CheckpointError):
        load_med_weights(med, tmp_path / "bad.pth")


def test_position_embeddings_are_resized_over_the_patch_grid():
    grid = torch.arange(16.0).reshape(1, 16, 1)
    embedding = torch.cat([torch.full((1, 1, 1), -1.0), grid], dim=1)
    resized = resize_position_embedding(embedding, 37)
    assert resized.shape == (1, 37, 1) and resized[0, 0, 0] == -1.0
    assert resized[0, 1, 0] < resized[0, 6, 0] < resized[0, 36, 0]  # still increasing across the grid
    with pytest.raises(CheckpointError, match="square"):
        resize_position_embedding(embedding, 30)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_config, tokenizer):
    size = tiny_config.vision_config.image_size
    tokens = tokenizer(["a red square", "a blue circle"], padding="max_length", max_length=8, return_tensors="pt")
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        med = build_med(tiny_config, tokenizer, MEDSettings(queue_size=4)).train()
        if checkpointing:
            med.enable_gradient_checkpointing()
        layer, calls = med.text_decoder.bert.encoder.layer[0], []
        feed_forward = layer.feed_forward_chunk
        layer.feed_forward_chunk = lambda x: calls.append(1) or feed_forward(x)
        losses = med(pixels, tokens.input_ids, tokens.attention_mask, alpha=0.4,
                     generator=torch.Generator().manual_seed(0))
        in_forward = len(calls)
        sum(losses.values()).backward()
        assert (len(calls) > in_forward) == checkpointing  # the layer ran again in backward
        grads.append([p.grad.clone() for p in med.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
