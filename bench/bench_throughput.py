"""CapFilt throughput, three ways side by side on the same models and images: images per second.

(a) ``plain``: what a user writes with transformers alone: ``BlipForConditionalGeneration.generate`` for
    the captions, then ``BlipForImageTextRetrieval(use_itm_head=True)`` once for the web texts and once for
    the captions (each call encodes the images again). Full precision on CPU; bf16 autocast on CUDA.
(b) ``engine``: capfilt's ``Captioner`` and ``Filter`` on the same PIL images (one ViT pass per model,
    ITM and ITC for every text), at capfilt's precision for the device.
(c) ``pipeline``: ``process_shard`` from img2dataset-style Parquet shards of the same images (JPEG bytes)
    to kept/rejected/failed Parquet: decode, models, writing and commit; models loaded beforehand (Beam's
    own per-job overhead is ``bench/bench_pipeline.py``'s).

Random-weight models of a preset size (``tiny``, ``base`` = ViT-B/16, ``large`` = ViT-L/16; 384 px; BERT
text with the real 30,524-token vocabulary for base and large), one nucleus caption per image (p = 0.9)
and every caption exactly ``--caption-tokens`` long (min = max length), so that runs compare. Each way
runs once to warm up, then ``--rounds`` times; the best round counts. Peak memory is the process's peak
RSS during the way (CPU) or torch's peak allocation (CUDA). On CUDA it also prints the model FLOPs
utilisation (MFU): the engine's FLOPs per image (counted by ``torch.utils.flop_counter``) times images/s,
over the card's dense bf16 peak.

BLIP-2 and CLIP rows (``--config blip2-tiny blip2-small clip-tiny clip-small``): (a) and (b) only. ``blip2-*``
is a BLIP-2 captioner with an OPT language model, ``Blip2ForConditionalGeneration.generate`` on transformers'
``Blip2ImageProcessor`` pixels against capfilt's ``Blip2Captioner`` (one nucleus caption of exactly
``--caption-tokens`` new tokens, no prompt); ``clip-*`` a CLIP ranker scoring the web text and one caption
per image, ``CLIPModel`` on ``CLIPProcessor`` inputs (every text against every image of the batch, the
diagonal kept) against capfilt's ``ClipRanker`` (one image encoding, each text against its own image).
Sizes (random weights, ``FAMILY_SIZES``): blip2-small is a ViT of width 384, 6 layers at 224 px, a 4-layer
Q-Former with 32 queries and a 6-layer OPT of width 512 with OPT's 50,272-token vocabulary; clip-small is
CLIP ViT-B/32's shape (224 px, 12 + 12 layers of width 768 / 512), its 49,408-token vocabulary.

    HF_HUB_OFFLINE=1 nice .venv/bin/python bench/bench_throughput.py --config base --images 8
    HF_HUB_OFFLINE=1 nice .venv/bin/python bench/bench_throughput.py --config blip2-small clip-small --images 8
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_throughput.py --config base large --device cuda --images 512
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

try:  # transformers >= 5.2x; a GPU machine's older transformers has the numpy-backed processor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil as BlipImageProcessor
except ImportError:
    from transformers import BlipImageProcessor

from capfilt.captioner import Captioner, SamplingSettings
from capfilt.configs import preset_config
from capfilt.device import autocast, pick_device, precision_name
from capfilt.filter import MAX_TEXT_TOKENS, Filter
from capfilt.attention import use_sdpa
from capfilt.vocab import compact_tokenizer

WORDS = "a picture of the small large red green blue circle square triangle left right above below".split()
BERT_WORDS = 30522  # bert-base-uncased's vocabulary size: base and large get an LM head of the real width
# What a plain transformers user gets: full precision on CPU, bf16 autocast on CUDA (as capfilt there).
PLAIN_PRECISION = {"cpu": "fp32", "cuda": "auto"}
WEB_TEXT = "a small red circle left of a large blue square"
# Dense bf16 peak of a card, TFLOP/s (vendors' data sheets, without sparsity); --peak-tflops overrides.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0,
                    "A10": 125.0, "V100": 125.0, "T4": 65.0}


# BLIP-2 (OPT) and CLIP sizes: (vision width, layers, image size, patch), (Q-Former width, layers, queries),
# (LM / CLIP text width, layers, vocabulary)
FAMILY_SIZES = {
    "blip2-tiny": ((64, 2, 64, 16), (64, 2, 8), (64, 2, 1000)),
    "blip2-small": ((384, 6, 224, 16), (256, 4, 32), (512, 6, 50272)),
    "clip-tiny": ((64, 2, 64, 16), None, (64, 2, 1000)),
    "clip-small": ((768, 12, 224, 32), None, (512, 12, 49408)),
}


def word_tokenizer(vocab: int, template: str):
    """A word-level tokenizer over ``vocab`` entries (the benchmark's words first), saved nowhere."""
    from tokenizers import Tokenizer, models as token_models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>", "<image>", "<s>", *WORDS]
    words += [f"w{i}" for i in range(vocab - len(words))]
    backend = Tokenizer(token_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("</s>", 1), ("<s>", 4)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def build_family(name: str, device: torch.device, precision: str) -> dict:
    """A random-weight BLIP-2 (OPT) captioner or CLIP ranker: transformers' model and capfilt's on a copy."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, CLIPConfig, CLIPModel

    (width, depth, size, patch), qformer, (text_width, text_depth, vocab) = FAMILY_SIZES[name]
    vision = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=depth,
                  num_attention_heads=max(1, width // 64), image_size=size, patch_size=patch)
    torch.manual_seed(0)
    if name.startswith("blip2"):
        from capfilt.blip2 import Blip2Captioner

        q_width, q_depth, queries = qformer
        config = Blip2Config(vision_config=vision, num_query_tokens=queries, image_token_index=3,
                             qformer_config=dict(hidden_size=q_width, num_hidden_layers=q_depth,
                                                 num_attention_heads=max(1, q_width // 64),
                                                 intermediate_size=4 * q_width, encoder_hidden_size=width),
                             text_config=dict(model_type="opt", vocab_size=vocab, hidden_size=text_width,
                                              word_embed_proj_dim=text_width, num_hidden_layers=text_depth,
                                              ffn_dim=4 * text_width, num_attention_heads=max(1, text_width // 64),
                                              bos_token_id=1, eos_token_id=1, pad_token_id=0))
        hf = Blip2ForConditionalGeneration(config).eval()
        tokenizer = word_tokenizer(vocab, "</s> $A")
        ours = Blip2Captioner(model=copy.deepcopy(hf), tokenizer=tokenizer, device=device, precision=precision)
    else:
        from capfilt.clip_ranker import ClipRanker

        config = CLIPConfig(vision_config=vision, projection_dim=text_width,
                            text_config=dict(vocab_size=vocab, hidden_size=text_width, intermediate_size=4 * text_width,
                                             num_hidden_layers=text_depth, num_attention_heads=max(1, text_width // 64),
                                             max_position_embeddings=77, bos_token_id=4, eos_token_id=1,
                                             pad_token_id=0))
        hf = CLIPModel(config).eval()
        tokenizer = word_tokenizer(vocab, "<s> $A </s>")
        ours = ClipRanker(model=copy.deepcopy(hf), tokenizer=tokenizer, device=device, precision=precision)
    ours.model.requires_grad_(False)  # torch's FLOP counter trips over parameters that ask for gradients
    return {"config": config, "tokenizer": tokenizer, "hf": hf.to(device), "ours": ours}


def plain_family(name: str, models: dict, images: list[Image.Image], tokens: int, batch_size: int,
                 device: torch.device) -> int:
    """(a) for BLIP-2 / CLIP: transformers' processors and classes alone; returns captions or texts scored."""
    try:  # the PIL-backed processors, as the BLIP rows use (BlipImageProcessor: see the imports)
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor

    model, tokenizer, size = models["hf"], models["tokenizer"], models["config"].vision_config.image_size
    done = 0
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        with torch.no_grad(), autocast(device, PLAIN_PRECISION[device.type]):
            if name.startswith("blip2"):
                pixel_values = BlipImageProcessor(size={"height": size, "width": size})(
                    images=batch, return_tensors="pt")["pixel_values"].to(device)
                config = models["config"]
                prompt = torch.tensor([[config.image_token_index] * config.num_query_tokens + [1]] * len(batch),
                                      device=device)
                ids = model.generate(pixel_values=pixel_values, input_ids=prompt, do_sample=True, top_p=0.9,
                                     top_k=50, max_new_tokens=tokens, min_new_tokens=tokens)
                done += len(tokenizer.batch_decode(ids, skip_special_tokens=True))
            else:
                processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
                pixel_values = processor(images=batch, return_tensors="pt")["pixel_values"].to(device)
                texts = [WEB_TEXT] * len(batch) + ["a small red circle"] * len(batch)
                text = tokenizer(texts, padding="longest", truncation=True, max_length=77, return_tensors="pt")
                out = model(input_ids=text.input_ids.to(device), attention_mask=text.attention_mask.to(device),
                            pixel_values=pixel_values)
                rows = torch.arange(len(texts), device=device)
                done += len(out.logits_per_text[rows, rows % len(batch)].tolist())
    return done


def engine_family(name: str, models: dict, images: list[Image.Image], batch_size: int) -> int:
    """(b) for BLIP-2 / CLIP: capfilt's ``Blip2Captioner`` or ``ClipRanker``."""
    done = 0
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        if name.startswith("blip2"):
            done += sum(len(group) for group in models["ours"].caption(batch, seed=start))  # as engine()
        else:
            scores = models["ours"].score(batch, [[WEB_TEXT, "a small red circle"]] * len(batch))
            done += sum(len(group) for group in scores)
    return done


def run_family(name: str, args, device: torch.device) -> dict:
    """A BLIP-2 or CLIP row: (a) and (b), best of ``--rounds`` after a warm-up."""
    from capfilt.blip2 import LmSamplingSettings

    started = time.perf_counter()
    models = build_family(name, device, args.precision)
    if name.startswith("blip2"):
        models["ours"].settings = LmSamplingSettings(max_length=args.caption_tokens, min_length=args.caption_tokens)
    images = [Image.open(io.BytesIO(data)).convert("RGB") for data in make_images(args.images)]
    result = {"config": name, "images": args.images, "batch_size": args.batch_size,
              "caption_tokens": args.caption_tokens, "precision": precision_name(device, args.precision),
              "build_s": round(time.perf_counter() - started, 1)}
    ways = {"plain": lambda: plain_family(name, models, images, args.caption_tokens, args.batch_size, device),
            "engine": lambda: engine_family(name, models, images, args.batch_size)}
    for way in [w for w in args.ways if w in ways]:
        seconds, memory = timed(ways[way], args.rounds, device)
        result[way] = {"images_per_s": args.images / seconds, **memory}
        print(f"{name} {way}: {result[way]['images_per_s']:.3f} images/s, peak {memory['peak_gb']:.2f} GB",
              file=sys.stderr, flush=True)
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        engine_family(name, models, images[:2], batch_size=2)
    result["engine_gflop_per_image"] = counter.get_total_flops() / 2 / 1e9
    return result


def build(config_name: str, device: torch.device, precision: str) -> dict:
    """Random-weight captioner and filter; the plain way gets transformers' own (eager) copies."""
    folder = Path(tempfile.mkdtemp(prefix="capfilt-bench-tok-"))
    words = WORDS if config_name == "tiny" else WORDS + [f"w{i}" for i in range(BERT_WORDS)]
    tokenizer = compact_tokenizer(words[: max(len(WORDS), BERT_WORDS - 104 - 72)], folder)
    shutil.rmtree(folder, ignore_errors=True)
    config = preset_config(config_name, tokenizer=tokenizer)
    torch.manual_seed(0)
    hf_captioner = BlipForConditionalGeneration(config).eval()
    torch.manual_seed(1)
    hf_filter = BlipForImageTextRetrieval(config).eval()
    captioner = Captioner(model=use_sdpa(copy.deepcopy(hf_captioner)), tokenizer=tokenizer, device=device,
                          precision=precision)
    filter_ = Filter(model=use_sdpa(copy.deepcopy(hf_filter)), tokenizer=tokenizer, device=device,
                     precision=precision)
    return {"config": config, "tokenizer": tokenizer, "hf_captioner": hf_captioner.to(device),
            "hf_filter": hf_filter.to(device), "captioner": captioner, "filter": filter_}


def make_images(count: int, seed: int = 0) -> list[bytes]:
    """JPEGs of 512x384 (img2dataset's usual shorter side): smooth random colour fields plus noise."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((512, 384), Image.BILINEAR), dtype=np.int16)
        pixels = np.clip(field + rng.integers(-20, 21, field.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def plain(models: dict, images: list[Image.Image], settings: SamplingSettings, batch_size: int,
          device: torch.device) -> int:
    """(a) transformers alone; returns the number of texts scored."""
    tokenizer, captioner, filter_ = models["tokenizer"], models["hf_captioner"], models["hf_filter"]
    processor = BlipImageProcessor(size={"height": models["config"].vision_config.image_size,
                                            "width": models["config"].vision_config.image_size})
    scored = 0
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        pixel_values = processor(images=batch, return_tensors="pt")["pixel_values"].to(device)
        prompt = tokenizer([settings.prompt] * len(batch), return_tensors="pt").input_ids.to(device)
        with torch.no_grad(), autocast(device, PLAIN_PRECISION[device.type]):
            ids = captioner.generate(pixel_values=pixel_values, input_ids=prompt, max_length=settings.max_length,
                                     min_length=settings.min_length, do_sample=True, top_p=settings.top_p,
                                     top_k=settings.top_k, repetition_penalty=1.1)
            captions = tokenizer.batch_decode(ids, skip_special_tokens=True)
            for texts in ([WEB_TEXT] * len(batch), captions):
                tokens = tokenizer(texts, padding="longest", truncation=True, max_length=MAX_TEXT_TOKENS,
                                   return_tensors="pt").to(device)
                itm = filter_(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                              pixel_values=pixel_values, use_itm_head=True).itm_score.float().softmax(dim=-1)[:, 1]
                scored += len(itm.tolist())
    return scored


def engine(models: dict, images: list[Image.Image], batch_size: int, seed: int = 0) -> int:
    """(b) capfilt's captioner and filter; returns the number of texts scored."""
    scored = 0
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        captions = models["captioner"].caption(batch, num_captions=1, seed=seed + start)
        scores = models["filter"].score(batch, [[WEB_TEXT, *group] for group in captions])
        scored += sum(len(group) for group in scores)
    return scored


def write_shards(folder: Path, images: list[bytes], shards: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    per_shard = -(-len(images) // shards)
    for shard in range(shards):
        rows = [{"key": f"{i:09d}", "url": f"http://bench/{i}.jpg", "caption": WEB_TEXT, "jpg": images[i],
                 "status": "success", "error_message": None}
                for i in range(shard * per_shard, min(len(images), (shard + 1) * per_shard))]
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{shard:05d}.parquet")


def pipeline(models: dict, work: Path, shards: list, settings) -> int:
    """(c) shards to Parquet with ``process_shard``; returns the number of texts scored."""
    # Imported here: the pipeline needs apache-beam, which a bare GPU machine may lack ((a) and (b) do not).
    from capfilt.pipelines.layout import OutputLayout
    from capfilt.pipelines.worker_models import Models
    from capfilt.pipelines.process import process_shard

    out = work / f"out-{time.monotonic_ns()}"
    layout = OutputLayout(str(out))
    pair = Models(models["captioner"], models["filter"])
    scored = 0
    for shard in shards:
        stats = process_shard(shard, pair, settings, layout)
        scored += sum(stats["kept"].values()) + sum(stats["rejected"].values())
    shutil.rmtree(out, ignore_errors=True)
    return scored


@contextmanager
def peak_memory(device: torch.device, into: dict):
    """The peak during the block, in GB: torch's allocations on CUDA, the process's RSS on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS
        except OSError:
            pass
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        into["peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    else:
        status = Path("/proc/self/status").read_text()
        into["peak_gb"] = next(int(line.split()[1]) for line in status.splitlines()
                               if line.startswith("VmHWM")) / 1e6


def timed(run, rounds: int, device: torch.device) -> tuple[float, dict]:
    """Best wall time of ``rounds`` runs after one warm-up run, and the peak memory of all of them."""
    memory: dict = {}
    with peak_memory(device, memory):
        run()
        best = float("inf")
        for _ in range(rounds):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - start)
    return best, memory


def engine_flops(models: dict, images: list[Image.Image]) -> float:
    """FLOPs per image of the engine (ViTs, decoding, ITM and ITC), counted on two images."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        engine(models, images[:2], batch_size=2)
    return counter.get_total_flops() / 2


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for card, tflops in BF16_PEAK_TFLOPS.items() if card in name), None)


def run_config(name: str, args, device: torch.device, work: Path) -> dict:
    started = time.perf_counter()
    models = build(name, device, args.precision)
    load_seconds = time.perf_counter() - started
    tokens = args.caption_tokens
    sampling = SamplingSettings(max_length=tokens, min_length=tokens)
    models["captioner"].settings = sampling
    jpegs = make_images(args.images)
    images = [Image.open(io.BytesIO(data)).convert("RGB") for data in jpegs]
    shards = settings = None
    if "pipeline" in args.ways:
        from capfilt.pipelines.settings import BootstrapSettings
        from capfilt.pipelines.shards import list_shards

        write_shards(work / name, jpegs, args.shards)
        shards = list_shards(str(work / name))
        settings = BootstrapSettings(captioner="bench", filter="bench", batch_size=args.batch_size,
                                     sampling_overrides={"max_length": tokens, "min_length": tokens})
    ways = {
        "plain": lambda: plain(models, images, sampling, args.batch_size, device),
        "engine": lambda: engine(models, images, args.batch_size),
        "pipeline": lambda: pipeline(models, work, shards, settings),
    }
    result = {"config": name, "images": args.images, "batch_size": args.batch_size, "caption_tokens": tokens,
              "precision": precision_name(device, args.precision), "build_s": round(load_seconds, 1)}
    for way in args.ways:
        seconds, memory = timed(ways[way], args.rounds, device)
        result[way] = {"images_per_s": args.images / seconds, **memory}
        print(f"{name} {way}: {result[way]['images_per_s']:.3f} images/s, peak {memory['peak_gb']:.2f} GB",
              file=sys.stderr, flush=True)
    flops = engine_flops(models, images)
    result["engine_gflop_per_image"] = flops / 1e9
    peak = peak_tflops(device, args.peak_tflops)
    if peak and "engine" in result:
        result["engine_mfu"] = result["engine"]["images_per_s"] * flops / (peak * 1e12)
    return result


def table(results: list[dict], device_name: str) -> str:
    lines = [f"device: {device_name}", "",
             "| config | plain img/s | engine img/s | pipeline img/s | engine/plain | pipeline/engine "
             "| peak GB (plain/engine/pipeline) | GFLOP/img | MFU |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        def rate(way):
            return f"{r[way]['images_per_s']:.2f}" if way in r else "–"

        def ratio(top, bottom):
            if top in r and bottom in r:
                return f"{r[top]['images_per_s'] / r[bottom]['images_per_s']:.2f}x"
            return "–"

        peaks = "/".join(f"{r[w]['peak_gb']:.1f}" if w in r else "–" for w in ("plain", "engine", "pipeline"))
        mfu = f"{100 * r['engine_mfu']:.1f}%" if "engine_mfu" in r else "–"
        lines.append(f"| {r['config']} ({r['precision']}) | {rate('plain')} | {rate('engine')} | {rate('pipeline')} "
                     f"| {ratio('engine', 'plain')} | {ratio('pipeline', 'engine')} | {peaks} "
                     f"| {r['engine_gflop_per_image']:.0f} | {mfu} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", nargs="+", default=["base"],
                        choices=("tiny", "base", "large", *FAMILY_SIZES),
                        help="model sizes to run, one after the other (BLIP; blip2-*, clip-*: FAMILY_SIZES)")
    parser.add_argument("--images", type=int, default=8, help="images per round (and in the shards)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per model call, every way")
    parser.add_argument("--caption-tokens", type=int, default=20,
                        help="every caption's length in tokens, prompt included (min = max length)")
    parser.add_argument("--shards", type=int, default=1, help="input shards the images are spread over")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds after the warm-up; the best counts")
    parser.add_argument("--ways", nargs="+", default=["plain", "engine", "pipeline"],
                        choices=("plain", "engine", "pipeline"))
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                        help="the engine's and the pipeline's (capfilt.device); the plain way is fp32 on CPU")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak (MFU)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores"
    work = Path(tempfile.mkdtemp(prefix="capfilt-bench-"))
    results = []
    try:
        for name in args.config:
            run = run_family(name, args, device) if name in FAMILY_SIZES else run_config(name, args, device, work)
            results.append(run)
            print(json.dumps(results[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(results, device_name))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_name, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
