"""Initialising a MED from transformers folders and original checkpoints (capfilt.models.weights)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from capfilt.checkpoints import CheckpointError, hf_to_original
from capfilt.configs import preset_config
from capfilt.models.med import MEDSettings, build_med
from capfilt.models.weights import fit_queue, load_med_weights, resize_position_embedding

QUEUE_KEYS = ("image_queue", "text_queue", "idx_queue", "queue_ptr")


def blip_layout(state_dict, momentum=True, queues=True):
    """A MED state dict in the layout of BLIP's pre-training checkpoint (``model_base.pth``).

    Online modules under the original names; momentum copies as
    ``visual_encoder_m.*``, ``vision_proj_m.*``, ``text_encoder_m.*``,
    ``text_proj_m.*``; queues as columns (``[embed_dim, queue_size]``) and
    ``queue_ptr`` ``[1]``. BLIP's pre-training model has no ``idx_queue``.
    """
    is_momentum = {key: key.split(".")[0].endswith("_m") for key in state_dict}
    original = hf_to_original({k: v for k, v in state_dict.items() if not is_momentum[k] and k not in QUEUE_KEYS})
    if momentum:
        for key, tensor in state_dict.items():
            if is_momentum[key]:
                head, rest = key.split(".", 1)
                (name,) = hf_to_original({f"{head[:-2]}.{rest}": tensor})
                head, rest = name.split(".", 1)
                original[f"{head}_m.{rest}"] = tensor
    if queues:
        original["image_queue"] = state_dict["image_queue"].t().contiguous()
        original["text_queue"] = state_dict["text_queue"].t().contiguous()
        original["queue_ptr"] = state_dict["queue_ptr"].reshape(1)
    return original


def pretrained_source(tiny_config, tokenizer, queue_size=4, pointer=0):
    """A random MED whose momentum copies differ from its online modules and whose queues hold known features."""
    torch.manual_seed(0)
    source = build_med(tiny_config, tokenizer, MEDSettings(queue_size=queue_size))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        source.temp.fill_(0.05)
        for _, momentum in source.momentum_pairs():
            for param in momentum.parameters():
                param.add_(torch.randn(param.shape, generator=generator))
        for queue in (source.image_queue, source.text_queue):
            queue.copy_(F.normalize(torch.randn(queue.shape, generator=generator), dim=1))
        source.queue_ptr.fill_(pointer)
    return source


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


def test_original_checkpoint_initialises_a_med(tmp_path, tiny_config, tokenizer, caplog):
    source = pretrained_source(tiny_config, tokenizer)
    saved = {k: v.clone() for k, v in source.state_dict().items()}
    original = blip_layout(saved)
    assert "visual_encoder_m.pos_embed" in original
    assert original["image_queue"].shape == (tiny_config.image_text_hidden_size, 4)
    torch.save({"model": original}, tmp_path / "model_base.pth")
    torch.manual_seed(1)
    med = build_med(tiny_config, tokenizer, MEDSettings(queue_size=4))
    with caplog.at_level(logging.INFO, logger="capfilt.models.weights"):
        load_med_weights(med, tmp_path / "model_base.pth")
    mine = med.state_dict()
    assert all(torch.equal(saved[k], mine[k]) for k in saved if k != "idx_queue")  # online, momentum, queues, ptr
    assert torch.equal(mine["idx_queue"], torch.full((4,), -100))
    momentum = [k for k in saved if k.split(".")[0].endswith("_m")]
    assert len(momentum) > 20 and not torch.equal(mine["vision_proj_m.weight"], mine["vision_proj.weight"])
    assert not torch.equal(mine["vision_model_m.embeddings.patch_embedding.weight"],
                           mine["vision_model.embeddings.patch_embedding.weight"])
    assert med.temp.item() == pytest.approx(0.05)
    assert "momentum encoders loaded" in caplog.text and "ITC queues of 4 features loaded" in caplog.text


def test_original_checkpoint_without_momentum_or_queues_starts_them(tmp_path, tiny_config, tokenizer, caplog):
    source = pretrained_source(tiny_config, tokenizer)
    torch.save({"model": blip_layout(source.state_dict(), momentum=False, queues=False)}, tmp_path / "ft.pth")
    torch.manual_seed(1)
    med = build_med(tiny_config, tokenizer, MEDSettings(queue_size=4))
    fresh = {key: getattr(med, key).clone() for key in QUEUE_KEYS}
    with caplog.at_level(logging.INFO, logger="capfilt.models.weights"):
        load_med_weights(med, tmp_path / "ft.pth")
    for online, momentum in med.momentum_pairs():  # copies of the online modules, not the source's momentum
        assert all(torch.equal(p, p_m) for p, p_m in zip(online.parameters(), momentum.parameters(), strict=True))
    assert all(torch.equal(getattr(med, key), fresh[key]) for key in QUEUE_KEYS)
    assert "no momentum encoders" in caplog.text and "no ITC queues: they start fresh" in caplog.text


@pytest.mark.parametrize("size", [4, 6, 8])
def test_original_queues_of_another_size_keep_the_newest_features(tmp_path, tiny_config, tokenizer, caplog, size):
    source = pretrained_source(tiny_config, tokenizer, queue_size=6, pointer=2)
    original = blip_layout(source.state_dict())
    original["ptr_queue"] = original.pop("queue_ptr")  # the retrieval model's names, with its image ids
    original["idx_queue"] = torch.arange(6).reshape(1, 6)
    torch.save({"model": original}, tmp_path / "model_retrieval.pth")
    med = build_med(tiny_config, tokenizer, MEDSettings(queue_size=size))
    fresh, fresh_images = med.text_queue.clone(), med.image_queue.clone()
    with caplog.at_level(logging.INFO, logger="capfilt.models.weights"):
        load_med_weights(med, tmp_path / "model_retrieval.pth")
    oldest_first = source.text_queue[[2, 3, 4, 5, 0, 1]]  # the write pointer was at row 2: rows 2..5 are older
    expected = {4: oldest_first[2:], 6: oldest_first, 8: torch.cat([fresh[:2], oldest_first])}[size]
    assert torch.equal(med.text_queue, expected) and int(med.queue_ptr) == 0
    assert torch.equal(med.image_queue, fit_queue(source.image_queue, 2, fresh_images))
    assert torch.equal(med.idx_queue, torch.full((size,), -100))  # the source's ids name its own images
    assert f"this run's hold {size}" in caplog.text or size == 6
    assert "image ids are not loaded" in caplog.text


def test_original_momentum_keys_are_loaded_strictly(tmp_path, tiny_config, tokenizer):
    source = pretrained_source(tiny_config, tokenizer)
    med = build_med(tiny_config, tokenizer, MEDSettings(queue_size=4))
    for change, error in [
        (lambda sd: sd.__setitem__("text_proj_m.weight", torch.zeros(3, 3)), r"text_proj_m\.weight \(3, 3\)"),
        (lambda sd: sd.pop("vision_proj_m.bias"), r"missing: \['vision_proj_m\.bias'\]"),
        (lambda sd: sd.__setitem__("itm_head_m.weight", torch.zeros(2, 32)), r"itm_head_m\.weight"),
        (lambda sd: sd.__setitem__("text_queue", torch.zeros(7, 4)), r"text_queue \(4, 7\)"),
        (lambda sd: sd.pop("text_queue"), "image_queue but not the other"),
    ]:
        original = blip_layout(source.state_dict())
        change(original)
        torch.save({"model": original}, tmp_path / "bad.pth")
        with pytest.raises(CheckpointError, match=error):
            load_med_weights(med, tmp_path / "bad.pth")


def test_momentum_position_embeddings_are_interpolated_too(tmp_path, tiny_config, tokenizer):
    source = pretrained_source(tiny_config, tokenizer)
    torch.save({"model": blip_layout(source.state_dict())}, tmp_path / "model_base.pth")
    med = build_med(preset_config("tiny", image_size=48, tokenizer=tokenizer), tokenizer, MEDSettings(queue_size=4))
    load_med_weights(med, tmp_path / "model_base.pth")
    for name in ("vision_model", "vision_model_m"):
        table = getattr(source, name).embeddings.position_embedding
        assert torch.equal(getattr(med, name).embeddings.position_embedding, resize_position_embedding(table, 37))


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
