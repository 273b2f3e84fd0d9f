"""Does a from-scratch demo ViT learn where things are? A probe, not a test (docs/research-log.md, "Where the gap is").

    python research/probe_vit_positions.py --init random sincos --steps 2000
    python research/probe_vit_positions.py --task shape --patch-size 8 4 --steps 600
    python research/probe_vit_positions.py --task shape --init sincos --lr 5e-4 1e-3 --steps 600
    python research/probe_vit_positions.py --task shape --init random --steps 300 --warmup 100 --lr 2e-3
    python research/probe_vit_positions.py --task shape --model cnn --steps 300

A bare ``demo``-preset ViT (``BlipVisionModel``) with a linear head on its
first token learns one question about freshly rendered shapes-world images:
``axis``: is a two-object scene a horizontal pair (left of / right of) or a
vertical one (above / below)? ``shape``: which shape is a one-object scene's
object? Batch 64, AdamW with weight decay 0.05 and lr 5e-4 (the demo
recipe's pre-training values; ``--lr`` tries others), no warm-up; the
held-out accuracy on 512 images of another seed is printed every 100 steps.
One process per setting, one thread each, side by side.

Optimisation knobs, to tell a slow optimiser from a missing inductive bias:
``--warmup`` (linear, steps), ``--clip`` (gradient norm), ``--weight-decay``,
``--pool mean`` (mean of the patch tokens instead of the first token),
``--weight-init torch`` (PyTorch's default Linear/Conv init instead of BLIP's
normal(0, 0.02)). ``--model cnn`` swaps the ViT for a three-layer
convolutional network with global max pooling, the same head and optimiser:
how fast the question can be learned with a translation-invariant bias.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time


# The probe's defaults for the optimisation knobs (the demo recipe's ViT and optimiser); the name of a run lists
# only the knobs that differ.
KNOBS = {"model": "vit", "pool": "cls", "weight_init": "blip", "warmup": 0, "clip": 0.0, "weight_decay": 0.05}


def probe(task: str, init: str, patch_size: int, lr: float, steps: int, seed: int, knobs: dict) -> None:
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
    if knobs["model"] == "cnn":
        layers, channels = [], (3, 32, 64, vision.hidden_size)
        for c_in, c_out in zip(channels, channels[1:]):
            layers += [torch.nn.Conv2d(c_in, c_out, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2)]
        cnn = torch.nn.Sequential(*layers[:-1], torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten())
        encoder, features = cnn, cnn
    else:
        vit = BlipVisionModel(vision)
        if knobs["weight_init"] == "torch":
            for module in vit.modules():
                if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                    module.reset_parameters()
        if init == "sincos":  # as --vision-position-init sincos starts a MED's ViT
            start_positions_at_sincos(vit)
        encoder = vit

        def features(images):
            tokens = vit(pixel_values=images).last_hidden_state
            return tokens[:, 0] if knobs["pool"] == "cls" else tokens[:, 1:].mean(1)
    classes = ("vertical", "horizontal") if task == "axis" else SHAPES
    head = torch.nn.Linear(vision.hidden_size, len(classes))
    parameters = [*encoder.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=knobs["weight_decay"])
    warmup = knobs["warmup"]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(warmup, 1)))

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
    changed = " ".join(f"{key}={value}" for key, value in knobs.items() if value != KNOBS[key])
    name, start = f"{task} init={init} patch={patch_size} lr={lr:g} {changed}".rstrip(), time.time()
    for step in range(1, steps + 1):
        images, labels = batch(train, 64)
        loss = torch.nn.functional.cross_entropy(head(features(images)), labels)
        optimizer.zero_grad()
        loss.backward()
        if knobs["clip"]:
            torch.nn.utils.clip_grad_norm_(parameters, knobs["clip"])
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps:
            with torch.no_grad():
                predicted = head(features(test_images)).argmax(1)
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
    parser.add_argument("--model", choices=("vit", "cnn"), default=KNOBS["model"])
    parser.add_argument("--pool", choices=("cls", "mean"), default=KNOBS["pool"])
    parser.add_argument("--weight-init", choices=("blip", "torch"), default=KNOBS["weight_init"])
    parser.add_argument("--warmup", type=int, default=KNOBS["warmup"])
    parser.add_argument("--clip", type=float, default=KNOBS["clip"])
    parser.add_argument("--weight-decay", type=float, default=KNOBS["weight_decay"])
    args = parser.parse_args()
    knobs = {key: getattr(args, key) for key in KNOBS}
    jobs = [multiprocessing.Process(target=probe, args=(args.task, init, patch, lr, args.steps, args.seed, knobs))
            for init in args.init for patch in args.patch_size for lr in args.lr]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join()


if __name__ == "__main__":
    main()
