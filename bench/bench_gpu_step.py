"""Milliseconds per optimizer step of the demo MED with the batch already on the device (no loader).

    python bench/bench_gpu_step.py                 # CUDA if present (bf16 autocast), else CPU
    python bench/bench_gpu_step.py --batch 64 256 --steps 30
    python bench/bench_gpu_step.py --batch 64 --attention sdpa eager   # the ViT's SDPA against eager

For each task's losses (pre-training ITC + ITM + LM, captioner LM, filter
ITC + ITM) it times forward, backward and AdamW on one random batch of
shapes-world size (64 px, 32 tokens), after warm-up steps, synchronising the
device before reading the clock. ``--attention eager`` turns the ViT's
attention back into transformers' eager one (capfilt/attention.py). Set against a training log's samples/s, it
says whether the model or the loader limits training.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time

import torch

TASKS = {"pretrain": ("itc", "itm", "lm"), "captioner": ("lm",), "filter": ("itc", "itm")}


def step_ms(losses: tuple[str, ...], batch: int, steps: int, device: torch.device,
            attention: str = "sdpa") -> float:
    from capfilt.configs import preset_config
    from capfilt.attention import use_eager
    from capfilt.models.med import MED, MEDSettings
    from capfilt.shapes import VOCABULARY
    from capfilt.tokenizer import special_ids
    from capfilt.vocab import compact_tokenizer

    with tempfile.TemporaryDirectory() as folder:
        tokenizer = compact_tokenizer([*VOCABULARY, "picture"], folder)
    torch.manual_seed(0)
    med = MED(preset_config("demo", image_size=64, tokenizer=tokenizer), special_ids(tokenizer),
              MEDSettings(losses=losses, queue_size=4096)).to(device)
    if attention == "eager":  # same weights, transformers' own forward
        use_eager(med)
    optimizer = torch.optim.AdamW([p for p in med.parameters() if p.requires_grad], lr=1e-4)
    pixels = torch.randn(batch, 3, 64, 64, device=device)
    input_ids = torch.randint(5, len(tokenizer), (batch, 32), device=device)
    input_ids[:, 0] = tokenizer.cls_token_id
    mask = torch.ones_like(input_ids)
    ids = torch.arange(batch, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def one_step() -> None:
        with autocast:
            out = med(pixel_values=pixels, input_ids=input_ids, attention_mask=mask, image_ids=ids, alpha=0.4,
                      generator=torch.Generator().manual_seed(0))
        optimizer.zero_grad(set_to_none=True)
        sum(out.values()).backward()
        optimizer.step()

    for _ in range(5):
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--attention", nargs="+", default=["sdpa"], choices=("sdpa", "eager"),
                        help="the ViT's attention (capfilt's SDPA, the default, or transformers' eager)")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# {name}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print("| task | batch | attention | ms / step | samples / s |")
    print("| --- | --- | --- | --- | --- |")
    for task, losses in TASKS.items():
        for batch in args.batch:
            for attention in args.attention:
                ms = step_ms(losses, batch, args.steps, device, attention)
                print(f"| {task} | {batch} | {attention} | {ms:.1f} | {batch / ms * 1000:.0f} |", flush=True)


if __name__ == "__main__":
    main()
