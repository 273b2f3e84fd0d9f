"""What a trained captioner and filter see of shapes and where things are. A probe, not a test (docs/research-log.md).

    python research/probe_demo_models.py --captioner demo --filter demo
    python research/probe_demo_models.py --captioner /work/sincos/install/captioner --filter /work/sincos/install/filter

On the evaluation split (``web``, seed 20221, the first ``--n`` pairs, as ``python -m capfilt.recipes.evaluate``):
- captioner: greedy one-object captions, the shape said for each true size and shape (a confusion table);
- captioner: how large the ViT's position embeddings are (std, [CLS] left out) beside how much its patch
  embeddings vary across an image (std after each image's mean patch is taken away), on 64 ``human`` images;
- filter: the ROC AUC of the ITM match probability, clean texts against each noise kind, per scene type (the
  chance that a clean text outscores a noisy one: 1 separates them at some threshold, 0.5 is blind), and the
  median clean match probability.
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import replace

import torch

from capfilt.shapes.captions import parse
from capfilt.recipes.evaluate import EVALUATION_SEED, scene_type
from capfilt.shapes.splits import iter_split
from capfilt.shapes.world import SHAPES


def shape_confusion(captioner, samples) -> None:
    said = Counter()
    captioner.settings = replace(captioner.settings, method="greedy")
    one_object = [s for s in samples if s.scene.relation is None]
    for start in range(0, len(one_object), 64):
        batch = one_object[start:start + 64]
        for sample, (text,) in zip(batch, captioner.caption([s.image for s in batch], seed=start)):
            parsed, obj = parse(text), sample.scene.objects[0]
            said[obj.size, obj.shape, parsed.phrases[0].shape if parsed and not parsed.relation else "other"] += 1
    print("| object | n | " + " | ".join(f"said {name}" for name in (*SHAPES, "other")) + " |")
    print("| --- | --- |" + " --- |" * (len(SHAPES) + 1))
    for size in ("small", "large"):
        for shape in SHAPES:
            n = sum(count for (sz, sh, _), count in said.items() if (sz, sh) == (size, shape))
            print(f"| {size} {shape} | {n} | " + " | ".join(f"{said[size, shape, name] / max(n, 1):.0%}"
                                                         for name in (*SHAPES, "other")) + " |")


def position_magnitudes(captioner) -> None:
    from capfilt.models.augment import to_normalised_tensor

    embeddings = captioner.model.vision_model.embeddings
    weight = embeddings.patch_embedding.weight
    images = torch.stack([to_normalised_tensor(s.image) for s in iter_split("human", 64, 11)]).to(weight)
    patches = embeddings.patch_embedding(images).flatten(2).transpose(1, 2).float()
    variation = (patches - patches.mean(1, keepdim=True)).std().item()
    positions = embeddings.position_embedding[0, 1:].float().std().item()
    print(f"ViT position embeddings: std {positions:.3f}; patch embeddings across an image: std {variation:.3f}")


def auc(positives: list[float], negatives: list[float]) -> float:
    """P(a positive outscores a negative), ties counted half (the Mann-Whitney form of the ROC AUC)."""
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def filter_separation(filter_, samples) -> None:
    scores: dict[tuple[str, str], list[float]] = {}
    for start in range(0, len(samples), 64):
        batch = samples[start:start + 64]
        for sample, (score,) in zip(batch, filter_.score([s.image for s in batch], [[s.text] for s in batch])):
            scores.setdefault((sample.kind, scene_type(sample.scene)), []).append(score.itm)
    print("| scene type | clean median | AUC clean vs partial | vs mismatch | vs alt |")
    print("| --- | --- | --- | --- | --- |")
    for scene in ("one object", "two objects"):
        clean = sorted(scores[("clean", scene)])
        print(f"| {scene} | {clean[len(clean) // 2]:.2f} | " + " | ".join(
            f"{auc(clean, scores[(kind, scene)]):.3f}" for kind in ("partial", "mismatch", "alt")) + " |")


@torch.no_grad()
def main() -> None:
    from capfilt.captioner import Captioner
    from capfilt.filter import Filter

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--captioner", default=None, help="model reference (e.g. demo); omit to skip")
    parser.add_argument("--filter", default=None, help="model reference (e.g. demo); omit to skip")
    parser.add_argument("--n", type=int, default=1000, help="pairs of the evaluation split")
    args = parser.parse_args()
    samples = list(iter_split("web", args.n, EVALUATION_SEED))
    if args.captioner:
        captioner = Captioner.load(args.captioner)
        shape_confusion(captioner, samples)
        position_magnitudes(captioner)
    if args.filter:
        filter_separation(Filter.load(args.filter), samples)


if __name__ == "__main__":
    main()
