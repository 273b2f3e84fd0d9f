"""A filter fine-tuning step (ITC + ITM) of the demo model with its ViT frozen: the momentum ViT's forward
reused from the online one (``MED._momentum_image_embeds``) against run on its own.

    python bench/bench_frozen_vit_step.py                 # batch 64, 20 timed steps, torch's threads
    python bench/bench_frozen_vit_step.py --threads 1

The MED is the shipped demo filter (``capfilt/demo_models/filter``, loaded
without momentum weights, so its momentum ViT starts equal to the frozen
one and stays so). Inputs are random pixels and shapes-world captions; the
optimizer is AdamW at a tiny learning rate. Captions are padded to 32
tokens by default, as the loader pads them (the demo recipe's ``max_tokens``);
the trainer now cuts that padding before each step (``trim_padding``), which
``--max-tokens 0`` reproduces. Each variant runs one untimed
warm-up step, then the timed ones; the two variants alternate in blocks of
5 steps so that a machine that speeds up or slows down affects both alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant (a multiple of 5)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--max-tokens", type=int, default=32,
                        help="pad every caption to this many tokens, as the loader does (the demo recipe's 32); "
                             "0: to the batch's longest, as the trainer's step sees them")
    args = parser.parse_args()

    import torch
    from transformers import BlipConfig

    from capfilt.shipped import DEMO_MODELS
    from capfilt.models.med import MED, MEDSettings
    from capfilt.models.weights import load_med_weights
    from capfilt.shapes import iter_split
    from capfilt.tokenizer import load_tokenizer, special_ids

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = DEMO_MODELS / "filter"
    tokenizer = load_tokenizer(folder)
    settings = MEDSettings(losses=("itc", "itm"), freeze_vision=True, queue_size=4096)
    med = MED(BlipConfig.from_pretrained(folder), special_ids(tokenizer), settings)
    load_med_weights(med, folder)
    med.train()
    optimizer = torch.optim.AdamW([p for p in med.parameters() if p.requires_grad], lr=1e-8)
    captions = [sample.text for sample in iter_split("human", args.batch, seed=3)]
    tokens = tokenizer(captions, return_tensors="pt", **(
        dict(padding="max_length", max_length=args.max_tokens, truncation=True) if args.max_tokens else
        dict(padding="longest")))
    pixels = torch.randn(args.batch, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ids = torch.arange(args.batch)

    def own_forward(pixel_values, _image_embeds):
        with torch.no_grad():
            return med.vision_model_m.eval()(pixel_values=pixel_values).last_hidden_state

    variants = {"reused": med._momentum_image_embeds, "own forward": own_forward}

    def step() -> None:
        losses = med(pixels, tokens.input_ids, tokens.attention_mask, image_ids=ids, alpha=0.4,
                     generator=torch.Generator().manual_seed(0))
        sum(losses.values()).backward()
        optimizer.step()
        optimizer.zero_grad()

    seconds = dict.fromkeys(variants, 0.0)
    for name, variant in variants.items():  # warm-up
        med._momentum_image_embeds = variant
        step()
    for _ in range(args.steps // 5):
        for name, variant in variants.items():
            med._momentum_image_embeds = variant
            start = time.perf_counter()
            for _ in range(5):
                step()
            seconds[name] += time.perf_counter() - start
    print(f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, batch {args.batch} of {tokens.input_ids.shape[1]} tokens, {args.steps // 5 * 5} timed steps each")
    for name, total in seconds.items():
        per_step = total / (args.steps // 5 * 5)
        print(f"momentum ViT {name:12s} {per_step:.3f} s/step  {args.batch / per_step:6.1f} samples/s")


if __name__ == "__main__":
    main()
