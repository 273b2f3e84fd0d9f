"""Does a from-scratch demo ViT learn where things are? A probe, not a test (docs/demo.md, "Where the gap is").

    python bench/probe_vit_positions.py --init random sincos --steps 2000
    python bench/probe_vit_positions.py --task shape --patch-size 8 4 --steps 600
    python bench/probe_vit_positions.py --task shape --init sincos --lr 5e-4 1e-3 --steps 600

A bare ``demo``-preset ViT (``BlipVisionModel``) with a linear head on its
first token learns one question about freshly rendered shapes-world images:
``axis``: is a two-object scene a horizontal pair (left of / right of) or a
vertical one (above / below)? ``shape``: which shape is a one-object scene's
object? Batch 64, AdamW with weight decay 0.05 and lr 5e-4 (the demo
recipe's pre-training values; ``--lr`` tries others), no warm-up; the
held-out accuracy on 512 images of another seed is printed every 100 steps.
One process per setting, one thread each, side by side.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time


def probe(task: str, init: str, patch_size: int, lr: float, steps: int, seed: int) -> None:
    import torch

    from capfilt.configs import preset_config
    from capfilt.models.augment import to_normalised_tensor
    from capfilt.models.med import start_positions_at_sincos
    from capfilt.shapes.splits import iter_split
    from capfilt.shapes.world import SHAPES
    from transformers import BlipVisionModel

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    vision = preset_config("demo", patch_size=patch_size).vision_config
    vit = BlipVisionModel(vision)
    if init == "sincos":  # as --vision-position-init sincos starts a MED's ViT
        start_positions_at_sincos(vit)
    classes = ("vertical", "horizontal") if task == "axis" else SHAPES
    head = torch.nn.Linear(vision.hidden_size, len(classes))
    optimizer = torch.optim.AdamW([*vit.parameters(), *head.parameters()], lr=lr, weight_decay=0.05)

    def labelled(split_seed: int):
        for sample in iter_split("human", 10**9, split_seed):
            scene = sample.scene
            if task == "axis" and scene.relation is not None:
                label = int(scene.relation in ("left of", "right of"))
            elif task == "shape" and scene.relation is None:
                label = SHAPES.index(scene.objects[0].shape)
            else:
                continue
            yield to_normalised_tensor(sample.image), label

    def batch(stream, size: int):
        images, labels = zip(*(next(stream) for _ in range(size)))
        return torch.stack(images), torch.tensor(labels)

    train, (test_images, test_labels) = labelled(11), batch(labelled(99), 512)
    name, start = f"{task} init={init} patch={patch_size} lr={lr:g}", time.time()
    for step in range(1, steps + 1):
        images, labels = batch(train, 64)
        loss = torch.nn.functional.cross_entropy(head(vit(pixel_values=images).last_hidden_state[:, 0]), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps:
            with torch.no_grad():
                predicted = head(vit(pixel_values=test_images).last_hidden_state[:, 0]).argmax(1)
            accuracy = (predicted == test_labels).float().mean().item()
            print(f"{name} step {step}: loss {loss.item():.3f}, held-out accuracy {accuracy:.1%} "
                  f"({time.time() - start:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=("axis", "shape"), default="axis")
    parser.add_argument("--init", nargs="+", choices=("random", "sincos"), default=["random", "sincos"])
    parser.add_argument("--patch-size", nargs="+", type=int, default=[8])
    parser.add_argument("--lr", nargs="+", type=float, default=[5e-4])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    jobs = [multiprocessing.Process(target=probe, args=(args.task, init, patch, lr, args.steps, args.seed))
            for init in args.init for patch in args.patch_size for lr in args.lr]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join()


if __name__ == "__main__":
    main()
