"""The demo MED's training values: one source for ``--model demo`` (``capfilt.models.train``) and for
``make demo-models`` (``capfilt.recipes.demo.DemoRecipe``, which starts from them), so that the trainer never
imports the recipe above it. No torch here: the command line reads these without loading a model.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DemoTraining:
    """How the shapes-world demo MED trains (2 CPU cores); see ``capfilt.recipes.demo.DemoRecipe`` for the rest."""

    batch_size: int = 64
    pretrain_lr: float = 5e-4
    finetune_lr: float = 2e-4
    queue_size: int = 4096  # ITC queue: a multiple of the batch; 57,600 in the paper is for 2,880-pair batches
    max_tokens: int = 32
    patch_size: int = 8  # an 8x8 grid at 64 px; 4 gives a 16x16 grid, 4x the ViT tokens (docs/research-log.md)
    vision_position_init: str = "random"  # BLIP's; "sincos" starts pre-training's ViT positions at 2-D sin-cos
    # Fine-tuning trains the text side only, the ViT frozen as pre-training left it. BLIP fine-tunes the ViT too;
    # with it frozen the demo captioner learned a relation's direction (docs/research-log.md).
    freeze_vision: bool = True


DEMO_TRAINING = DemoTraining()
