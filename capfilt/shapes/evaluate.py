"""How good are a captioner and a filter on the shapes world? (shapes-world.md, "What is measured on it")

- Filter, on a ``web`` split: the fraction of each noisy kind (``mismatch``,
  ``partial``, ``alt``) removed and the fraction of ``clean`` texts kept, at
  the paper's ITM threshold of 0.5.
- Captioner, on any split: the fraction of synthetic captions that are
  correct for their scene (``is_correct``: converses count), per scene type
  (one or two objects) and per decoding method: nucleus sampling (p = 0.9),
  greedy and beam search.
- Retrieval, on a clean split (``test``): image→text and text→image
  recall@1 of a filter's ITC, and of ITC's top k re-ranked by ITM.

``python -m capfilt.shapes.evaluate --captioner demo --filter demo`` prints
the table and writes it as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch
import torch.nn.functional as F

from capfilt.captioner import Captioner
from capfilt.device import autocast
from capfilt.filter import ITM_THRESHOLD, Filter
from capfilt.shapes.captions import is_correct
from capfilt.shapes.scene import Scene
from capfilt.shapes.splits import Sample, iter_split
from capfilt.shapes.web import KINDS

EVALUATION_SEED = 20221  # a seed no training split of `make demo-models` uses
METHODS = ("greedy", "beam", "nucleus")


def _batches(samples: list[Sample], size: int):
    for start in range(0, len(samples), size):
        yield samples[start : start + size]


def scene_type(scene: Scene) -> str:
    """``one object`` or ``two objects``: the rows of the caption table."""
    return "one object" if len(scene.objects) == 1 else "two objects"


def evaluate_filter(filter_: Filter, samples: list[Sample], threshold: float = ITM_THRESHOLD,
                    batch_size: int = 64) -> dict:
    """Per web-text kind: how many texts, and the fraction removed (ITM match probability < threshold)."""
    removed = {kind: 0 for kind in KINDS}
    counts = {kind: 0 for kind in KINDS}
    for batch in _batches(samples, batch_size):
        scores = filter_.score([s.image for s in batch], [[s.text] for s in batch])
        for sample, (score,) in zip(batch, scores):
            counts[sample.kind] += 1
            removed[sample.kind] += score.is_noise(threshold)
    return {kind: {"n": counts[kind], "removed": removed[kind] / counts[kind] if counts[kind] else None}
            for kind in KINDS}


def evaluate_captioner(captioner: Captioner, samples: list[Sample], methods=METHODS, batch_size: int = 64,
                       seed: int = 0) -> dict:
    """Per method and scene type: how many scenes, the fraction captioned correctly, and a few wrong captions."""
    results = {}
    original = captioner.settings
    try:
        for method in methods:
            captioner.settings = replace(original, method=method)
            tally: dict[str, dict] = {}
            for number, batch in enumerate(_batches(samples, batch_size)):
                captions = captioner.caption([s.image for s in batch], seed=seed + number)
                for sample, (text,) in zip(batch, captions):
                    entry = tally.setdefault(scene_type(sample.scene), {"n": 0, "correct": 0, "wrong": []})
                    entry["n"] += 1
                    if is_correct(text, sample.scene):
                        entry["correct"] += 1
                    elif len(entry["wrong"]) < 5:
                        entry["wrong"].append({"caption": text, "truth": sample.text})
            results[method] = {kind: {"n": e["n"], "correct": e["correct"] / e["n"], "wrong": e["wrong"]}
                               for kind, e in sorted(tally.items())}
    finally:
        captioner.settings = original
    return results


@torch.no_grad()
def evaluate_retrieval(filter_: Filter, samples: list[Sample], rerank_k: int = 16, batch_size: int = 64) -> dict:
    """Image→text and text→image recall@1 among ``samples``' images and texts (a clean split: one caption each).

    BLIP's retrieval protocol: ITC similarities rank every candidate, then ITM
    re-ranks ITC's top ``rerank_k`` (256 on COCO in BLIP's evaluation; a
    thousand-pair shapes split needs fewer). Many shapes scenes share one exact
    caption, so a hit is judged by the parser, not by index: image→text hits when
    the retrieved text is a correct caption of the query image, text→image when
    the query text is a correct caption of the retrieved image. ``batch_size``:
    images (and texts) per encoder call.
    """
    with autocast(filter_.device):  # as Filter.score runs (bf16 on CUDA; nothing changes on CPU)
        return _retrieval(filter_, samples, rerank_k, batch_size)


def _retrieval(filter_: Filter, samples: list[Sample], rerank_k: int, batch_size: int) -> dict:
    model, scenes, texts = filter_.model, [s.scene for s in samples], [s.text for s in samples]
    embeds, image_feats = [], []
    for batch in _batches(samples, batch_size):
        pixel_values = filter_.preprocess([s.image for s in batch]).to(filter_.device)
        batch_embeds = model.vision_model(pixel_values=pixel_values).last_hidden_state
        embeds.append(batch_embeds)
        image_feats.append(F.normalize(model.vision_proj(batch_embeds[:, 0]).float(), dim=-1))
    embeds, image_feats = torch.cat(embeds), torch.cat(image_feats)
    tokens = filter_.tokenize(texts)  # padded to the longest text, so any subset of rows can be scored
    text_feats = []
    for start in range(0, len(texts), batch_size):
        rows = slice(start, start + batch_size)
        cls = model.text_encoder(input_ids=tokens["input_ids"][rows],
                                 attention_mask=tokens["attention_mask"][rows]).last_hidden_state[:, 0]
        text_feats.append(F.normalize(model.text_proj(cls).float(), dim=-1))
    similarity = image_feats @ torch.cat(text_feats).T  # [images, texts]
    k = min(rerank_k, len(samples))

    def reranked(query: int, candidates: torch.Tensor, image_side: bool) -> int:
        images = torch.full_like(candidates, query) if image_side else candidates
        text_rows = candidates if image_side else torch.full_like(candidates, query)
        itm = filter_.match_probability(embeds, images, tokens["input_ids"][text_rows],
                                        tokens["attention_mask"][text_rows])
        return int(candidates[itm.argmax()])

    hits = {"image_to_text_itc": 0, "image_to_text_itm": 0, "text_to_image_itc": 0, "text_to_image_itm": 0}
    for i in range(len(samples)):  # image -> text
        candidates = similarity[i].topk(k).indices
        hits["image_to_text_itc"] += is_correct(texts[int(candidates[0])], scenes[i])
        hits["image_to_text_itm"] += is_correct(texts[reranked(i, candidates, True)], scenes[i])
    for j in range(len(samples)):  # text -> image
        candidates = similarity[:, j].topk(k).indices
        hits["text_to_image_itc"] += is_correct(texts[j], scenes[int(candidates[0])])
        hits["text_to_image_itm"] += is_correct(texts[j], scenes[reranked(j, candidates, False)])
    return {"n": len(samples), "rerank_k": k, **{name: count / len(samples) for name, count in hits.items()}}


def table(filter_results: dict | None, captioner_results: dict | None) -> str:
    """The results as a Markdown table (the README's)."""
    lines = []
    if filter_results:
        lines += ["| web-text kind | texts | removed |", "| --- | --- | --- |"]
        lines += [f"| {kind} | {r['n']} | {r['removed']:.1%} |" for kind, r in filter_results.items() if r["n"]]
        lines.append("")
    if captioner_results:
        kinds = sorted({kind for method in captioner_results.values() for kind in method})
        lines += ["| decoding | " + " | ".join(f"{k} correct" for k in kinds) + " |",
                  "| --- |" + " --- |" * len(kinds)]
        for method, by_kind in captioner_results.items():
            cells = [f"{by_kind[k]['correct']:.1%} (n={by_kind[k]['n']})" if k in by_kind else "-" for k in kinds]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m capfilt.shapes.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--captioner", default=None, help="model reference (e.g. demo); omit to skip")
    parser.add_argument("--filter", default=None, help="model reference (e.g. demo); omit to skip")
    parser.add_argument("--n", type=int, default=1000, help="web pairs to score / scenes to caption")
    parser.add_argument("--seed", type=int, default=EVALUATION_SEED, help="seed of the fresh web split")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--device", default=None, help="cpu (default) or cuda (bf16 autocast)")
    args = parser.parse_args(argv)
    samples = list(iter_split("web", args.n, args.seed))
    filter_results = evaluate_filter(Filter.load(args.filter, device=args.device), samples) if args.filter else None
    captioner_results = (evaluate_captioner(Captioner.load(args.captioner, device=args.device), samples, args.methods)
                         if args.captioner else None)
    print(table(filter_results, captioner_results))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"n": args.n, "seed": args.seed, "filter": filter_results, "captioner": captioner_results},
                      out, indent=2)


if __name__ == "__main__":
    main()
