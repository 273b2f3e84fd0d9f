"""Can a filter's text encoder learn a relation's direction through ITM? A probe, not a test (docs/research-log.md).

    python research/probe_itm_direction.py                                  # the shipped filter, lr 1e-4
    python research/probe_itm_direction.py --lr 5e-4 --steps 2000
    python research/probe_itm_direction.py --text-from-captioner demo       # encoder started from a captioner's decoder
    python research/probe_itm_direction.py --swap colour                    # a control: an attribute swapped instead

Two-object scenes of fresh ``human`` splits (training seed 11, validation
seed 31337). Each image is paired with its canonical caption (a match) and
with that caption's objects swapped (``capfilt.shapes.negatives``: the
relation the wrong way round, not a match). The two texts hold the same
words, so only the order tells them apart. The ViT is frozen and its tokens
are cached once; the text encoder and the ITM head train on ITM's
cross-entropy alone (batch of 64 images, so 128 pairs; AdamW). Every
``--every`` steps, on validation: how often the true caption scores higher
than its swap (chance 50%) and how often it clears the 0.5 threshold.

``--text-from-captioner`` starts the text encoder from a captioner's
decoder (every layer, its attention now bidirectional as the encoder's)
and takes that captioner's ViT: does a decoder that names the direction
carry it over to ITM? ``--swap colour`` (or size, shape) swaps that attribute
between the two objects instead: the same words again, a control that the
probe can learn what the filter already half knows.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def scenes(seed: int, n: int, what: str = "objects"):
    """The two-object samples among ``n`` human pairs that ``what`` can be swapped in: images, true captions, swaps."""
    from capfilt.shapes.captions import describe
    from capfilt.shapes.negatives import possible_swaps, swapped
    from capfilt.shapes.splits import iter_split

    images, true, swap = [], [], []
    for sample in iter_split("human", n, seed):
        parse = describe(sample.scene)
        if what in possible_swaps(parse):
            images.append(sample.image)
            true.append(str(parse))
            swap.append(str(swapped(parse, what)))
    return images, true, swap


def main(argv: list[str] | None = None) -> None:
    from capfilt.captioner import Captioner
    from capfilt.filter import Filter

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--filter", default="demo")
    parser.add_argument("--text-from-captioner", default="",
                        help="a captioner whose decoder and ViT replace the filter's text encoder and ViT")
    parser.add_argument("--swap", default="objects", choices=("objects", "size", "colour", "shape"),
                        help="what the negative swaps (objects: the relation's direction; else one attribute)")
    parser.add_argument("--n", type=int, default=12_000, help="training pairs drawn (about half have two objects)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="", help="cpu or cuda; default: cuda when there is one")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.time()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    filt = Filter.load(args.filter, device=device)
    model = filt.model.float()
    if args.text_from_captioner:
        decoder = Captioner.load(args.text_from_captioner).model.float()
        model.text_encoder.load_state_dict(decoder.text_decoder.bert.state_dict())
        model.vision_model.load_state_dict(decoder.vision_model.state_dict())
    model.to(device)
    model.eval()

    @torch.no_grad()
    def embed(images):
        return torch.cat([model.vision_model(pixel_values=filt.preprocess(images[i:i + 256]).to(device))
                          .last_hidden_state for i in range(0, len(images), 256)])

    def tokens(texts):  # [CLS]-led; Filter.itm_logits puts ITM's [ENC] in front
        encoded = filt.tokenize(texts)
        return encoded["input_ids"], encoded["attention_mask"]

    train_images, train_true, train_swap = scenes(11, args.n, args.swap)
    val_images, val_true, val_swap = scenes(31337, 2000, args.swap)
    train_embeds, val_embeds = embed(train_images), embed(val_images)
    train_texts, val_texts = (tokens(train_true), tokens(train_swap)), (tokens(val_true), tokens(val_swap))
    print(f"{len(train_images)} training and {len(val_images)} validation scenes, ViT tokens cached "
          f"({time.time() - start:.0f} s); swap {args.swap}, lr {args.lr}, {args.steps} steps on {device}", flush=True)

    def validate(step: int) -> None:
        model.text_encoder.eval()
        higher, kept = [], []
        for i in range(0, len(val_embeds), 250):
            rows = torch.arange(i, min(i + 250, len(val_embeds)), device=device)
            true, swap = (filt.match_probability(val_embeds, rows, ids[rows], mask[rows]) for ids, mask in val_texts)
            higher.append(true > swap)
            kept.append(true > 0.5)
        model.text_encoder.train()
        print(f"step {step}: true caption above its swap {torch.cat(higher).float().mean():.1%}, "
              f"true caption kept {torch.cat(kept).float().mean():.1%} ({time.time() - start:.0f} s)", flush=True)

    params = [*model.text_encoder.parameters(), *model.itm_head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    generator = torch.Generator().manual_seed(0)
    validate(0)
    model.text_encoder.train()
    labels = torch.cat([torch.ones(64), torch.zeros(64)]).long().to(device)
    for step in range(1, args.steps + 1):
        rows = torch.randint(len(train_embeds), (64,), generator=generator).to(device)
        (true_ids, true_mask), (swap_ids, swap_mask) = ((ids[rows], mask[rows]) for ids, mask in train_texts)
        logits = filt.itm_logits(train_embeds, torch.cat([rows, rows]), torch.cat([true_ids, swap_ids]),
                                 torch.cat([true_mask, swap_mask]))
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.every == 0:
            validate(step)


if __name__ == "__main__":
    main()
