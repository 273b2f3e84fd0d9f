"""Does the demo ViT say where each object is? Linear probes on its tokens; a probe, not a test (docs/research-log.md).

    python research/probe_binding.py                         # the shipped captioner's ViT
    python research/probe_binding.py --captioner PATH --n 1500
    python research/probe_binding.py --filter demo           # the shipped filter's ViT

On the two-object scenes of a fresh ``human`` split (seed 77), ridge
regressions on the ViT's tokens at the objects' centres, per layer, fitted
on 70% of the scenes and scored on the rest: object A's x from A's token
(R²); whether A is left of B (horizontal pairs only) from A's token alone,
and from A's and B's tokens together (accuracy). If these are high while the
captioner names the relation's direction at chance, the image side knows
where things are and the text side does not read it.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def ridge(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, strength: float) -> np.ndarray:
    """Closed-form ridge regression with an intercept; predictions for ``x_test``."""
    x1, t1 = np.c_[x, np.ones(len(x))], np.c_[x_test, np.ones(len(x_test))]
    return t1 @ np.linalg.solve(x1.T @ x1 + strength * np.eye(x1.shape[1]), x1.T @ y)


def main(argv: list[str] | None = None) -> None:
    from capfilt.captioner import Captioner
    from capfilt.filter import Filter
    from capfilt.shapes.splits import iter_split

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--captioner", default="demo")
    parser.add_argument("--filter", default="", help="probe this filter's ViT instead of the captioner's")
    parser.add_argument("--n", type=int, default=1500, help="human pairs drawn (about half have two objects)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    loaded = Filter.load(args.filter) if args.filter else Captioner.load(args.captioner)
    vision = loaded.model.float().vision_model
    name = f"filter {args.filter}" if args.filter else f"captioner {args.captioner}"
    patch = vision.config.patch_size
    grid = vision.config.image_size // patch
    scenes = [s for s in iter_split("human", args.n, 77) if s.scene.relation is not None]
    hidden = []
    with torch.no_grad():
        for start in range(0, len(scenes), 64):
            batch = scenes[start:start + 64]
            out = vision(pixel_values=loaded.preprocess([s.image for s in batch]), output_hidden_states=True)
            layers = torch.stack(out.hidden_states, 1)  # [B, layers + 1, tokens, width]
            centres = [[1 + int(o.cy // patch) * grid + int(o.cx // patch) for o in s.scene.objects] for s in batch]
            hidden += [layers[i, :, c].numpy() for i, c in enumerate(centres)]

    hidden = np.stack(hidden)  # [scenes, layers + 1, 2 objects, width]
    x = np.array([[o.cx for o in s.scene.objects] for s in scenes])
    horizontal = np.array([s.scene.relation in ("left of", "right of") for s in scenes])
    train = np.arange(len(scenes)) < int(0.7 * len(scenes))
    print(f"ViT ({name}): {len(scenes)} two-object scenes, {grid}x{grid} patches; "
          "held-out scores of linear probes on the tokens at the objects' centres")
    for layer in range(hidden.shape[1]):
        a = hidden[:, layer, 0]
        predicted = ridge(a[train], x[train, 0], a[~train], 1.0)
        r2 = 1 - ((predicted - x[~train, 0]) ** 2).mean() / x[~train, 0].var()
        left = np.where(x[:, 0] < x[:, 1], 1.0, -1.0)
        fit, test = train & horizontal, ~train & horizontal
        alone = ((ridge(a[fit], left[fit], a[test], 10.0) > 0) == (left[test] > 0)).mean()
        both = np.c_[hidden[:, layer, 0], hidden[:, layer, 1]]
        together = ((ridge(both[fit], left[fit], both[test], 10.0) > 0) == (left[test] > 0)).mean()
        print(f"  layer {layer}: x of A from A's token R2 {r2:.3f}; A left of B from A's token {alone:.1%}, "
              f"from both tokens {together:.1%}")


if __name__ == "__main__":
    main()
