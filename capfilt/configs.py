"""Model sizes: BLIP base (ViT-B/16) and large (ViT-L/16), the shapes-world demo, a tiny one for tests.

A config is a transformers ``BlipConfig`` (vision + text + the 256-d ITC
projection), the object that ``save_pretrained`` writes as ``config.json``.
Every value below reproduces the original BLIP code (``configs/med_config.json``
and ``models/vit.py``); where transformers' defaults differ, the original wins:

- ViT LayerNorm eps 1e-6 (timm; transformers defaults to 1e-5).
- Text dropout 0.1 on hidden states and attention (med_config.json; only
  training sees it).
- Text: bert-base, 12 layers, 12 heads, 3072 intermediate, vocab 30524
  (bert-base-uncased's 30522 + ``[DEC]`` + ``[ENC]``), 512 positions,
  LayerNorm eps 1e-12; cross-attention width = the ViT's width.
- ITC projections to 256-d (``embed_dim`` in the original configs).
- ViT MLP ratio 4 (intermediate size = 4 x width).
- Heads 64 wide where nothing states a count (ViT-B/16 and BERT-base: 12,
  ViT-L/16: 16); a checkpoint's shapes give widths, never head counts.
- Image size 384, the fine-tuned captioners' and filters' resolution; the
  pre-trained checkpoints are 224 (pass ``image_size=224``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from typing import TYPE_CHECKING

from capfilt.tokenizer import special_ids

# transformers is imported where a config is built: the trainer's --help reads the presets without it.
if TYPE_CHECKING:
    from transformers import BlipConfig

VIT_LAYER_NORM_EPS = 1e-6  # timm's ViT, which BLIP's visual encoder is
TEXT_LAYER_NORM_EPS = 1e-12  # BERT
ITC_EMBED_DIM = 256  # paper §3.2: ITC features are 256-d
BERT_VOCAB_SIZE = 30522
BLIP_VOCAB_SIZE = BERT_VOCAB_SIZE + 2  # + [DEC] (30522) + [ENC] (30523)


def default_heads(width: int) -> int:
    """The head count assumed for a ``width``-wide transformer: the preset's of that width, else 64-wide heads.

    Shapes cannot tell heads apart (a ``width x width`` projection splits into any
    number of them), so a count not stated anywhere follows this rule.
    """
    known = {vit.width: vit.heads for vit, _ in PRESETS.values()}
    known.update({text.hidden_size: text.num_heads for _, text in PRESETS.values()})
    return known.get(width, max(1, width // 64))


@dataclass(frozen=True)
class VitSize:
    """The visual encoder's shape (``models/vit.py`` arguments in the original)."""

    width: int
    depth: int
    heads: int
    patch_size: int = 16
    image_size: int = 384
    mlp_ratio: float = 4.0


@dataclass(frozen=True)
class TextSize:
    """The BERT text transformer's shape (``med_config.json`` in the original)."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    vocab_size: int = BLIP_VOCAB_SIZE
    max_positions: int = 512
    dropout: float = 0.1


# The shapes-world demo models, trained on 2 CPU cores: the one place for their shape, which the trainer's
# ``--model demo`` (capfilt.models.presets) and `make demo-models` (capfilt.recipes.demo) read from here.
# 64 px images in patches of 8: an 8x8 grid of ViT tokens (patches of 4 would give 16x16, four times the tokens).
# No dropout: every training step sees freshly rendered pairs, so nothing is over-fitted.
DEMO_VIT = VitSize(width=128, depth=4, heads=4, patch_size=8, image_size=64)
DEMO_TEXT = TextSize(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512, max_positions=48,
                     dropout=0.0)

PRESETS: dict[str, tuple[VitSize, TextSize]] = {
    # BLIP w/ ViT-B/16: model_base*.pth, *_base_* captioners and filters.
    "base": (VitSize(width=768, depth=12, heads=12), TextSize()),
    # BLIP w/ ViT-L/16: model_large*.pth, *_large_* captioners and filters.
    "large": (VitSize(width=1024, depth=24, heads=16), TextSize()),
    "demo": (DEMO_VIT, DEMO_TEXT),
    # Random-weight tests only: tiny and fast on CPU.
    "tiny": (
        VitSize(width=32, depth=2, heads=2, patch_size=8, image_size=32),
        TextSize(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_positions=64, dropout=0.0),
    ),
}


def make_config(
    vit: VitSize,
    text: TextSize,
    *,
    embed_dim: int = ITC_EMBED_DIM,
    vit_layer_norm_eps: float = VIT_LAYER_NORM_EPS,
    bos_token_id: int = BERT_VOCAB_SIZE,
    pad_token_id: int = 0,
    sep_token_id: int = 102,
) -> BlipConfig:
    """A ``BlipConfig`` for the given sizes, ITC size ``embed_dim`` and special ids (BERT's by default)."""
    from transformers import BlipConfig, BlipTextConfig, BlipVisionConfig

    vision_config = BlipVisionConfig(
        hidden_size=vit.width,
        intermediate_size=round(vit.width * vit.mlp_ratio),
        num_hidden_layers=vit.depth,
        num_attention_heads=vit.heads,
        image_size=vit.image_size,
        patch_size=vit.patch_size,
        layer_norm_eps=vit_layer_norm_eps,
        initializer_range=0.02,
    )
    text_config = BlipTextConfig(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        encoder_hidden_size=vit.width,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_layers,
        num_attention_heads=text.num_heads,
        max_position_embeddings=text.max_positions,
        layer_norm_eps=TEXT_LAYER_NORM_EPS,
        hidden_dropout_prob=text.dropout,
        attention_probs_dropout_prob=text.dropout,
        bos_token_id=bos_token_id,
        pad_token_id=pad_token_id,
        sep_token_id=sep_token_id,
        eos_token_id=sep_token_id,
    )
    return BlipConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_text_hidden_size=embed_dim,
    )


def check_patch_size(image_size: int, patch_size: int) -> None:
    """A ViT cuts its image into whole patches: ``patch_size`` must divide ``image_size``."""
    if image_size % patch_size:
        raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch_size}")


def preset_config(name: str, *, image_size: int | None = None, patch_size: int | None = None,
                  tokenizer=None) -> BlipConfig:
    """The named preset (``base``, ``large``, ``demo``, ``tiny``).

    ``image_size`` and ``patch_size`` override the preset's; ``tokenizer`` (a BLIP tokenizer,
    see ``capfilt.tokenizer``) sets the vocabulary size and special ids, for
    models with a vocabulary other than bert-base-uncased's.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown model config {name!r}; choose one of {sorted(PRESETS)} or give a config file")
    vit, text = PRESETS[name]
    if image_size is not None:
        vit = replace(vit, image_size=image_size)
    if patch_size is not None:
        vit = replace(vit, patch_size=patch_size)
    check_patch_size(vit.image_size, vit.patch_size)
    if tokenizer is None:
        return make_config(vit, text)
    ids = special_ids(tokenizer)
    text = replace(text, vocab_size=len(tokenizer))
    return make_config(vit, text, bos_token_id=ids.dec, pad_token_id=ids.pad, sep_token_id=ids.sep)


VIT_KEYS = ("width", "depth", "heads", "patch_size", "image_size", "mlp_ratio", "embed_dim")


def config_from_med(med_config: str | Path | dict, vit: VitSize | dict | None = None,
                    embed_dim: int | None = None) -> BlipConfig:
    """A config from BLIP's own ``med_config.json`` and the ViT's sizes.

    The original repository describes its text transformer with a BERT-style
    ``med_config.json`` (``hidden_size``, ``num_hidden_layers``, ...,
    ``encoder_width``) and its ViT with arguments; this reads the same. The
    ViT comes as ``vit`` or as the file's ``"vit"`` entry: ``width``,
    ``depth``, ``patch_size``, ``image_size`` and optionally ``heads`` (else
    64-wide heads, see ``default_heads``), ``mlp_ratio`` (else 4) and
    ``embed_dim``, the ITC projections' size (else 256; also read from the
    top level of the file, as the original's ``embed_dim`` argument).
    """
    if not isinstance(med_config, dict):
        med_config = json.loads(Path(med_config).read_text())
    if vit is None:
        vit = med_config.get("vit")
        if not isinstance(vit, dict):
            raise ValueError('med_config has no "vit" entry giving the ViT\'s sizes')
    if isinstance(vit, dict):
        vit = dict(vit)
        unknown = sorted(set(vit) - set(VIT_KEYS))
        if unknown:
            raise ValueError(f'unknown "vit" keys {unknown}; known: {list(VIT_KEYS)}')
        vit_embed_dim = vit.pop("embed_dim", None)
        top_embed_dim = med_config.get("embed_dim")
        if None not in (vit_embed_dim, top_embed_dim) and vit_embed_dim != top_embed_dim:
            raise ValueError(f'"vit" embed_dim {vit_embed_dim} contradicts the top-level embed_dim {top_embed_dim}')
        if embed_dim is None:
            embed_dim = vit_embed_dim if vit_embed_dim is not None else top_embed_dim
        missing = sorted({"width", "depth"} - set(vit))
        if missing:
            raise ValueError(f'the "vit" entry needs {missing}')
        vit.setdefault("heads", default_heads(vit["width"]))
        vit = VitSize(**vit)
    encoder_width = med_config.get("encoder_width", vit.width)
    if encoder_width != vit.width:
        raise ValueError(f"med_config encoder_width {encoder_width} does not match the ViT width {vit.width}")
    text = TextSize(
        hidden_size=med_config["hidden_size"],
        num_layers=med_config["num_hidden_layers"],
        num_heads=med_config["num_attention_heads"],
        intermediate_size=med_config["intermediate_size"],
        vocab_size=med_config["vocab_size"],
        max_positions=med_config.get("max_position_embeddings", 512),
        dropout=med_config.get("hidden_dropout_prob", 0.1),
    )
    return make_config(vit, text, embed_dim=ITC_EMBED_DIM if embed_dim is None else embed_dim,
                       pad_token_id=med_config.get("pad_token_id", 0))
