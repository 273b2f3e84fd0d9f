"""The pre-flight role check: config.json and file names only (the folders here hold no weights at all)."""

from __future__ import annotations

import json

import pytest

from capfilt.checkpoints import CAPTIONER, FILTER, CheckpointError, resolve
from capfilt.model_kind import check_role, model_kind


def folder(tmp_path, name, model_type, architecture=None, tokenizer=True, qformer_tokenizer=False):
    path = tmp_path / name
    path.mkdir()
    config = {"model_type": model_type, **({"architectures": [architecture]} if architecture else {})}
    (path / "config.json").write_text(json.dumps(config))
    if tokenizer:
        (path / "tokenizer.json").write_text("{}")
    if qformer_tokenizer:
        (path / "qformer_tokenizer").mkdir()
        (path / "qformer_tokenizer" / "vocab.txt").write_text("[PAD]\n")
    return path


def one_line_error(ref, role, tokenizer=None) -> str:
    with pytest.raises(CheckpointError) as error:
        check_role(ref, role, tokenizer)
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("model_type, architecture, roles", [
    ("blip", "BlipForConditionalGeneration", (CAPTIONER,)),
    ("blip", "BlipForImageTextRetrieval", (FILTER,)),
    ("blip", None, (CAPTIONER, FILTER)),
    ("blip-2", "Blip2ForConditionalGeneration", (CAPTIONER,)),
    ("blip-2", "Blip2ForImageTextRetrieval", (FILTER,)),
    ("instructblip", "InstructBlipForConditionalGeneration", (CAPTIONER,)),
    ("clip", "CLIPModel", (FILTER,)),
    ("siglip", "SiglipModel", (FILTER,)),
])
def test_roles_follow_the_config(tmp_path, model_type, architecture, roles):
    path = folder(tmp_path, "m", model_type, architecture, qformer_tokenizer=model_type == "instructblip")
    for role in (CAPTIONER, FILTER):
        if role in roles:
            check_role(path, role)
        else:
            message = one_line_error(path, role)
            assert message.startswith(f"{role} '{path}' is a ") and f"the {role} accepts" in message


def test_exact_messages(tmp_path):
    clip = folder(tmp_path, "clip", "clip", "CLIPModel")
    assert one_line_error(clip, CAPTIONER) == (
        f"captioner '{clip}' is a CLIP model (CLIPModel), which capfilt takes as a filter; the captioner accepts a "
        "BLIP captioner (BlipForConditionalGeneration, an original .pth or demo), BLIP-2 with OPT or Flan-T5 "
        "(Blip2ForConditionalGeneration) or InstructBLIP (InstructBlipForConditionalGeneration)")
    bert = folder(tmp_path, "bert", "bert")
    assert one_line_error(bert, FILTER) == (
        f"filter '{bert}' is a 'bert' model (config.json's model_type), which capfilt cannot use; the filter accepts "
        "a BLIP ITM filter (BlipForImageTextRetrieval, an original .pth or demo), BLIP-2's Q-Former "
        "(Blip2ForImageTextRetrieval), CLIP (CLIPModel) or SigLIP (SiglipModel)")


def test_the_shipped_demo_models(tmp_path):
    check_role("demo", CAPTIONER)
    check_role("demo", FILTER)
    assert "which capfilt takes as a filter" in one_line_error(resolve("demo", FILTER).path, CAPTIONER)


def test_missing_tokenizers(tmp_path):
    bare = folder(tmp_path, "bare", "blip-2", "Blip2ForImageTextRetrieval", tokenizer=False)
    assert "has no tokenizer" in one_line_error(bare, FILTER) and "--filter-tokenizer" in one_line_error(bare, FILTER)
    check_role(bare, FILTER, tokenizer=folder(tmp_path, "tok", "bert"))
    assert "no tokenizer at" in one_line_error(bare, FILTER, tokenizer=tmp_path / "nowhere")
    instruct = folder(tmp_path, "instruct", "instructblip", "InstructBlipForConditionalGeneration")
    assert "no Q-Former tokenizer" in one_line_error(instruct, CAPTIONER)


def test_pth_files(tmp_path):
    """Issue 31, item 3: a missing .pth is a missing file, not a hub id to download."""
    message = one_line_error("models/model_large_caption.pth", CAPTIONER)
    assert message.startswith("no such file: models/model_large_caption.pth") and "hub" not in message
    assert "wget -P checkpoints" in message
    with pytest.raises(CheckpointError, match="no such file"):
        resolve("models/model_large_retrieval_coco.pth", FILTER)
    (tmp_path / "m").mkdir()
    pth = tmp_path / "m" / "model_base.pth"
    pth.write_bytes(b"not read")
    assert "has no tokenizer" in one_line_error(pth, FILTER)
    (tmp_path / "vocab.txt").write_text("[PAD]\n")
    check_role(pth, CAPTIONER, tokenizer=tmp_path / "vocab.txt")
    (tmp_path / "m" / "vocab.txt").write_text("[PAD]\n")
    check_role(pth, FILTER)
    assert model_kind(resolve(pth, FILTER)).family == "blip"


def test_hub_cache_ids(tmp_path, monkeypatch):
    import huggingface_hub.constants

    repo = tmp_path / "models--org--tiny-clip"
    snapshot = repo / "snapshots" / ("c" * 40)
    snapshot.parent.mkdir(parents=True)
    folder(snapshot.parent, snapshot.name, "clip", "CLIPModel")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    check_role("org/tiny-clip", FILTER)
    assert "which capfilt takes as a filter" in one_line_error("org/tiny-clip", CAPTIONER)
    assert "not in the local hub cache" in one_line_error("org/absent", CAPTIONER)
    assert "no model at" in one_line_error(tmp_path / "nothing", FILTER)


def test_a_blip_model_needs_a_blip_tokenizer(tmp_path):
    """A sentencepiece-only folder is a tokenizer for BLIP-2's language models, not for BLIP (BERT's WordPiece)."""
    pth = tmp_path / "model_base_caption.pth"
    pth.write_bytes(b"not read")
    spiece = tmp_path / "t5"
    spiece.mkdir()
    (spiece / "spiece.model").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="no tokenizer at"):
        check_role(str(pth), CAPTIONER, str(spiece))
