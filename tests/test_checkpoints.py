"""Loading: original Salesforce .pth layouts, HF folders, the hub cache; strictness."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

from capfilt.captioner import Captioner, SamplingSettings
from capfilt.checkpoints import CheckpointError, hf_to_original, infer_config, original_to_hf, resolve
from capfilt.configs import PRESETS, VitSize, make_config
from capfilt.filter import Filter
from capfilt.tokenizer import special_ids

GREEDY = SamplingSettings(method="greedy")


def original_captioner_dict(hf_captioner):
    """A captioner as BLIP saves it: original ViT names, old transformers' position_ids buffer."""
    state = hf_to_original(hf_captioner.state_dict())
    positions = hf_captioner.config.text_config.max_position_embeddings
    state["text_decoder.bert.embeddings.position_ids"] = torch.arange(positions).unsqueeze(0)
    return state


def original_pretrained_dict(hf_captioner, hf_retrieval):
    """A pre-trained BLIP file: ViT, text encoder, decoder, heads, momentum copies and queues."""
    state = original_captioner_dict(hf_captioner)
    retrieval = hf_to_original(hf_retrieval.state_dict())
    state.update({k: v for k, v in retrieval.items() if not k.startswith("visual_encoder.")})
    state.update({k.replace("visual_encoder.", "visual_encoder_m.", 1): v.clone()
                  for k, v in state.items() if k.startswith("visual_encoder.")})
    state.update({"text_proj_m.weight": state["text_proj.weight"].clone(), "temp": torch.tensor(0.07),
                  "image_queue": torch.randn(256, 8), "text_queue": torch.randn(256, 8),
                  "queue_ptr": torch.zeros(1, dtype=torch.long)})
    return state


def save_pth(state, path):
    torch.save({"model": state, "config": {"note": "ignored"}}, path)
    return path


def test_inverse_key_map_round_trips(hf_captioner):
    hf_state = hf_captioner.state_dict()
    original = hf_to_original(hf_state)
    assert "visual_encoder.blocks.0.attn.qkv.weight" in original
    assert "visual_encoder.pos_embed" in original and "visual_encoder.norm.weight" in original
    assert original_to_hf(original, "captioner").keys() == hf_state.keys()


def test_original_captioner_pth_gives_same_captions(tmp_path, hf_captioner, captioner_folder, images):
    path = save_pth(original_captioner_dict(hf_captioner), tmp_path / "model_caption.pth")
    from_pth = Captioner.load(path, tokenizer=captioner_folder, settings=GREEDY)
    from_hf = Captioner.load(captioner_folder, settings=GREEDY)
    assert from_pth.source.kind == "pth" and from_hf.source.kind == "hf"
    assert from_pth.model.config.vision_config.layer_norm_eps == 1e-6  # the original ViT's eps
    pixel_values = from_hf.preprocess(images)
    assert torch.equal(from_pth.generate_ids(pixel_values), from_hf.generate_ids(pixel_values))


def test_pretrained_pth_feeds_both_roles(tmp_path, hf_captioner, hf_retrieval, captioner_folder, images):
    path = save_pth(original_pretrained_dict(hf_captioner, hf_retrieval), tmp_path / "model_base.pth")
    captioner = Captioner.load(path, tokenizer=captioner_folder, settings=GREEDY)
    reference = Captioner.load(captioner_folder, settings=GREEDY)
    pixel_values = reference.preprocess(images)
    assert torch.equal(captioner.generate_ids(pixel_values), reference.generate_ids(pixel_values))

    # The filter takes the file's ViT (the captioner's here) with the text encoder and heads.
    expected_model = BlipForImageTextRetrieval(hf_retrieval.config).eval()
    expected_model.load_state_dict(hf_retrieval.state_dict())
    expected_model.vision_model.load_state_dict(hf_captioner.vision_model.state_dict())
    # fp32: the reference is transformers' eager ViT, capfilt's runs SDPA; under bf16 they round apart.
    expected = Filter(model=expected_model, tokenizer=reference.tokenizer, precision="fp32")
    filter_ = Filter.load(path, tokenizer=captioner_folder, precision="fp32")
    texts = [["a red circle", "a dog"]] * len(images)
    for got, want in zip(filter_.score(images, texts), expected.score(images, texts)):
        assert [s.itm for s in got] == pytest.approx([s.itm for s in want], abs=1e-6)
        assert [s.itc for s in got] == pytest.approx([s.itc for s in want], abs=1e-6)


def test_config_is_inferred_from_shapes_or_given(tmp_path, hf_captioner, tiny_config, captioner_folder):
    state = original_captioner_dict(hf_captioner)
    inferred = infer_config(state)
    for part in ("vision_config", "text_config"):
        want, got = getattr(tiny_config, part).to_dict(), getattr(inferred, part).to_dict()
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            assert got[key] == want[key], (part, key)
    assert inferred.vision_config.image_size == tiny_config.vision_config.image_size
    path = save_pth(state, tmp_path / "c.pth")
    med = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
           "vocab_size": tiny_config.text_config.vocab_size, "max_position_embeddings": 64, "encoder_width": 32,
           "vit": {"width": 32, "depth": 2, "heads": 2, "patch_size": 8, "image_size": 32}}
    (tmp_path / "med_config.json").write_text(json.dumps(med))
    Captioner.load(path, tokenizer=captioner_folder, config=tmp_path / "med_config.json")
    with pytest.raises(CheckpointError, match="mis-shaped keys: .*pos_embed|position_embedding"):
        Captioner.load(path, tokenizer=captioner_folder, config="base")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("text_decoder.cls.predictions.transform.dense.weight"),
         "missing keys: text_decoder.cls.predictions.transform.dense.weight"),
        (lambda s: s.__setitem__("text_decoder.bert.encoder.layer.0.extra.weight", torch.zeros(2)),
         "unexpected keys: text_decoder.bert.encoder.layer.0.extra.weight"),
        (lambda s: s.__setitem__("optimizer_state.step", torch.zeros(1)),
         "unexpected keys for a BLIP captioner: optimizer_state.step"),
        (lambda s: s.__setitem__("text_decoder.cls.predictions.bias", torch.zeros(3)),
         "mis-shaped keys: text_decoder.cls.predictions.bias"),
    ],
)
def test_original_loading_is_strict(tmp_path, hf_captioner, captioner_folder, edit, message):
    state = original_captioner_dict(hf_captioner)
    edit(state)
    path = save_pth(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=message.replace(".", r"\.")):
        Captioner.load(path, tokenizer=captioner_folder)


def test_hf_folder_loading_is_strict(tmp_path, hf_retrieval, tokenizer):
    hf_retrieval.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights.pop("itm_head.weight")
    weights["itm_head.extra"] = torch.zeros(1)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as error:
        Filter.load(tmp_path)
    assert "missing keys: itm_head.weight" in str(error.value)
    assert "unexpected keys: itm_head.extra" in str(error.value)


def test_hub_id_resolves_from_local_cache_only(tmp_path, monkeypatch, hf_captioner, tokenizer, images):
    import huggingface_hub.constants

    snapshot = tmp_path / "models--someone--tiny-captioner" / "snapshots" / ("a" * 40)
    hf_captioner.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (tmp_path / "models--someone--tiny-captioner" / "refs").mkdir()
    (tmp_path / "models--someone--tiny-captioner" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    captioner = Captioner.load("someone/tiny-captioner", settings=GREEDY)
    assert captioner.source.path == snapshot
    assert len(captioner.caption(images)) == 3
    with pytest.raises(CheckpointError, match="not in the local hub cache"):
        Captioner.load("someone/absent-model")


def test_bad_references_and_tokenizers(tmp_path, hf_captioner, captioner_folder):
    with pytest.raises(CheckpointError, match="no model at"):
        resolve(tmp_path / "nothing-here", "captioner")
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(CheckpointError, match="expected an original BLIP checkpoint"):
        resolve(tmp_path / "weights.txt", "captioner")
    (tmp_path / "broken.pth").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="cannot read"):
        Captioner.load(tmp_path / "broken.pth", tokenizer=captioner_folder)
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    path = save_pth(original_captioner_dict(hf_captioner), lonely / "model.pth")
    with pytest.raises(CheckpointError, match="needs a tokenizer"):
        Captioner.load(path)
    other = tmp_path / "other-vocab"
    other.mkdir()
    (other / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a"]) + "\n")
    with pytest.raises(CheckpointError, match="does not fit the model"):
        Captioner.load(path, tokenizer=other)


def test_config_json_without_vit_eps_gets_blips(tmp_path, hf_captioner, tiny_config, captioner_folder):
    data = tiny_config.to_dict()
    del data["vision_config"]["layer_norm_eps"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    path = save_pth(original_captioner_dict(hf_captioner), tmp_path / "model.pth")
    captioner = Captioner.load(path, tokenizer=captioner_folder, config=tmp_path / "config.json")
    assert captioner.model.config.vision_config.layer_norm_eps == 1e-6
    assert captioner.model.vision_model.post_layernorm.eps == 1e-6
    assert captioner.model.vision_model.encoder.layers[0].layer_norm1.eps == 1e-6


def odd_sized_models(tokenizer, mlp_ratio, itc):
    """A tiny captioner and retrieval model with a ViT MLP ratio and an ITC size other than BLIP's 4 and 256."""
    vit, text = PRESETS["tiny"]
    vit = VitSize(width=vit.width, depth=vit.depth, heads=vit.heads, patch_size=vit.patch_size,
                  image_size=vit.image_size, mlp_ratio=mlp_ratio)
    ids = special_ids(tokenizer)
    text = replace(text, vocab_size=len(tokenizer))
    config = make_config(vit, text, embed_dim=itc, bos_token_id=ids.dec, pad_token_id=ids.pad, sep_token_id=ids.sep)
    torch.manual_seed(3)
    return BlipForConditionalGeneration(config).eval(), BlipForImageTextRetrieval(config).eval()


@pytest.mark.parametrize("mlp_ratio, itc", [(2, 32), (3, 24)])
def test_mlp_ratio_and_itc_size_are_read_from_shapes(tmp_path, tokenizer, captioner_folder, images, mlp_ratio, itc):
    captioner_model, retrieval_model = odd_sized_models(tokenizer, mlp_ratio, itc)
    path = save_pth(original_pretrained_dict(captioner_model, retrieval_model), tmp_path / "model_odd.pth")
    inferred = infer_config(torch.load(path, weights_only=True)["model"])
    assert inferred.vision_config.intermediate_size == 32 * mlp_ratio and inferred.image_text_hidden_size == itc

    captioner = Captioner.load(path, tokenizer=captioner_folder, settings=GREEDY, precision="fp32")
    assert captioner.model.config.vision_config.intermediate_size == 32 * mlp_ratio
    reference = Captioner(model=copy.deepcopy(captioner_model), tokenizer=tokenizer, settings=GREEDY, precision="fp32")
    pixel_values = reference.preprocess(images)
    assert torch.equal(captioner.generate_ids(pixel_values), reference.generate_ids(pixel_values))

    filter_ = Filter.load(path, tokenizer=captioner_folder, precision="fp32")
    assert filter_.model.config.image_text_hidden_size == itc
    assert filter_.model.vision_proj.out_features == itc
    expected_model = copy.deepcopy(retrieval_model)
    expected_model.vision_model.load_state_dict(captioner_model.vision_model.state_dict())
    expected = Filter(model=expected_model, tokenizer=tokenizer, precision="fp32")
    texts = [["a red circle", "a dog"]] * len(images)
    for got, want in zip(filter_.score(images, texts), expected.score(images, texts)):
        assert [s.itm for s in got] == pytest.approx([s.itm for s in want], abs=1e-6)
        assert [s.itc for s in got] == pytest.approx([s.itc for s in want], abs=1e-6)


def write_med(tmp_path, tokenizer, **vit):
    med = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
           "vocab_size": len(tokenizer), "max_position_embeddings": 64, "encoder_width": 32,
           "vit": {"width": 32, "depth": 2, "patch_size": 8, "image_size": 32, **vit}}
    (tmp_path / "med_config.json").write_text(json.dumps(med))
    return tmp_path / "med_config.json"


def test_med_config_states_mlp_ratio_itc_size_and_heads(tmp_path, tokenizer, captioner_folder):
    captioner_model, retrieval_model = odd_sized_models(tokenizer, 2, 32)
    path = save_pth(original_pretrained_dict(captioner_model, retrieval_model), tmp_path / "model_odd.pth")
    med = write_med(tmp_path, tokenizer, mlp_ratio=2, embed_dim=32)
    filter_ = Filter.load(path, tokenizer=captioner_folder, config=med)
    vision = filter_.model.config.vision_config
    assert (vision.intermediate_size, filter_.model.config.image_text_hidden_size) == (64, 32)
    assert vision.num_attention_heads == 2  # not stated: the tiny preset's count for width 32
    med = write_med(tmp_path, tokenizer, mlp_ratio=2, embed_dim=32, heads=4)
    assert Filter.load(path, tokenizer=captioner_folder, config=med).model.config.vision_config.num_attention_heads == 4

    contradictions = [
        ({"mlp_ratio": 4, "embed_dim": 32}, "MLP ratio of 4 .*intermediate size 128.* 64 rows .*MLP ratio 2"),
        ({"mlp_ratio": 2, "embed_dim": 256}, r"ITC size \(embed_dim\) of 256 .* give 32"),
        ({"mlp_ratio": 2}, r"ITC size \(embed_dim\) of 256 .* give 32"),  # BLIP's 256 when not stated
        ({"mlp_ratio": 2, "embed_dim": 32, "heads": 3}, r"ViT heads \(3\) do not divide its width \(32\)"),
        ({"mlp_ratio": 2, "embed_dim": 32, "mlp": 2}, r"unknown \"vit\" keys \['mlp'\]"),
    ]
    for vit, message in contradictions:
        with pytest.raises(CheckpointError, match=message):
            Filter.load(path, tokenizer=captioner_folder, config=write_med(tmp_path, tokenizer, **vit))
    with pytest.raises(CheckpointError, match="MLP ratio of 4 .*MLP ratio 2"):
        Captioner.load(path, tokenizer=captioner_folder, config="tiny")
