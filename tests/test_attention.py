"""The ViT's SDPA attention (capfilt/attention.py) against transformers' own eager BLIP attention."""

from __future__ import annotations

import copy

import torch
from transformers import BlipForConditionalGeneration, BlipVisionModel
from transformers.models.blip.modeling_blip import BlipAttention

from capfilt.checkpoints import load_model
from capfilt.configs import preset_config
from capfilt.attention import SdpaBlipAttention, use_eager, use_sdpa
from capfilt.models.med import MED, MEDSettings
from capfilt.tokenizer import special_ids


def test_sdpa_vit_computes_what_the_eager_vit_computes():
    config = preset_config("demo").vision_config  # 4 layers, 4 heads, 65 tokens
    torch.manual_seed(0)
    eager = BlipVisionModel(config)
    fused = use_sdpa(copy.deepcopy(eager))
    assert [type(m) for m in fused.modules() if isinstance(m, BlipAttention)] == [SdpaBlipAttention] * 4
    assert fused.state_dict().keys() == eager.state_dict().keys()
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    weights = torch.randn(3, 65, config.hidden_size, generator=torch.Generator().manual_seed(2))
    outputs = []
    for model in (eager, fused):  # training mode: the same loss and the same gradients
        model.train()
        hidden = model(pixel_values=images).last_hidden_state
        (hidden * weights).sum().backward()
        outputs.append((hidden.detach(), [p.grad for p in model.parameters()]))
    (eager_hidden, eager_grads), (fused_hidden, fused_grads) = outputs
    torch.testing.assert_close(fused_hidden, eager_hidden, rtol=1e-5, atol=1e-5)
    for fused_grad, eager_grad in zip(fused_grads, eager_grads):  # float32 summation order aside
        assert (fused_grad - eager_grad).norm() <= 1e-5 * eager_grad.norm() + 1e-7
    assert {type(m) for m in use_eager(fused).modules() if isinstance(m, BlipAttention)} == {BlipAttention}


def test_loaded_models_and_the_med_use_sdpa(captioner_folder, hf_captioner, pixel_values, tokenizer, tiny_config):
    model, _, _ = load_model(BlipForConditionalGeneration, captioner_folder, "captioner")
    attention = [type(m) for m in model.vision_model.modules() if isinstance(m, BlipAttention)]
    assert attention and set(attention) == {SdpaBlipAttention}
    with torch.no_grad():  # transformers' eager model of the same weights sees the same image
        torch.testing.assert_close(model.vision_model(pixel_values=pixel_values).last_hidden_state,
                                   hf_captioner.vision_model(pixel_values=pixel_values).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)
    med = MED(tiny_config, special_ids(tokenizer), MEDSettings())
    for vit in (med.vision_model, med.vision_model_m):  # the momentum encoder is a deep copy: SDPA too
        assert {type(m) for m in vit.modules() if isinstance(m, BlipAttention)} == {SdpaBlipAttention}
