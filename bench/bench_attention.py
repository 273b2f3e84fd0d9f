"""The ViT's forward pass with transformers' eager attention and with capfilt's SDPA (capfilt/attention.py).

    python bench/bench_attention.py                          # ViT-B/16 at 384 px, batch 4, this CPU
    python bench/bench_attention.py --preset large --batch 32 --device cuda --dtype bfloat16

Random weights of the preset's size (the speed does not depend on the values). For each attention: the
seconds per batch (median of ``--repeats`` after one warm-up) and, on CUDA, the peak memory of a batch;
then the largest difference between the two outputs.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import BlipVisionModel

from capfilt.configs import preset_config
from capfilt.attention import use_sdpa


def measure(model: BlipVisionModel, images: torch.Tensor, repeats: int) -> tuple[float, float | None, torch.Tensor]:
    cuda = images.device.type == "cuda"
    with torch.no_grad():
        output = model(pixel_values=images).last_hidden_state  # warm-up
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(pixel_values=images)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return statistics.median(times), peak, output.float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="base", choices=("base", "large", "demo"))
    parser.add_argument("--image-size", type=int, default=384, help="BLIP's captioners and filters: 384")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = parser.parse_args()
    config = preset_config(args.preset).vision_config
    config.image_size = args.image_size
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    eager = BlipVisionModel(config).eval().to(args.device, dtype)
    fused = use_sdpa(copy.deepcopy(eager))
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=args.device, dtype=dtype)
    tokens = (args.image_size // config.patch_size) ** 2 + 1
    print(f"ViT {args.preset} at {args.image_size} px ({tokens} tokens), batch {args.batch}, {args.device} "
          f"{args.dtype}, {torch.get_num_threads()} CPU threads")
    results = {}
    for name, model in (("eager (transformers)", eager), ("SDPA (capfilt)", fused)):
        seconds, peak, output = measure(model, images, args.repeats)
        results[name] = output
        memory = f", peak {peak:.2f} GiB" if peak is not None else ""
        print(f"  {name}: {seconds:.3f} s per batch, {args.batch / seconds:.1f} images/s{memory}")
    eager_out, fused_out = results.values()
    print(f"  largest output difference: {(eager_out - fused_out).abs().max().item():.1e}")


if __name__ == "__main__":
    main()
