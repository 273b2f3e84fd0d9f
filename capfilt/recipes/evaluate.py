"""How good are a captioner and a filter on the shapes world? (docs/shapes.md)

- Filter, on a ``web`` split: the fraction of each noisy kind (``mismatch``,
  ``partial``, ``alt``) removed and the fraction of ``clean`` texts kept, at
  the paper's ITM threshold of 0.5.
- Captioner, on any split: the fraction of synthetic captions that are
  correct for their scene (``is_correct``: converses count), per scene type
  (one or two objects) and per decoding method: nucleus sampling (p = 0.9),
  greedy and beam search; and what the wrong ones get wrong (size, colour,
  shape, relation, object count: ``caption_errors``).
- Relation, teacher-forced: after object A's phrase, does the captioner
  rank the true relation first? (``evaluate_relation``: the relation apart
  from decoding and the attributes.)
- Filter breakdowns: each kind per scene type, and the partial texts per
  attribute changed.
- Filter binding: each two-object scene's caption against its swaps (the
  objects, or one attribute between them: ``capfilt.shapes.negatives``);
  does the true caption score higher, and is the swap removed?
  (``evaluate_swaps``: which object is where, apart from the web mixture.)
- Changed rendering (``--rendering changed``): the same split's scenes and
  texts, their images drawn by a second renderer (``capfilt.shapes.rerender``).
- Retrieval, on a clean split (``test``): image→text and text→image
  recall@1 of a filter's ITC, and of ITC's top k re-ranked by ITM.

``capfilt evaluate --captioner demo --filter demo`` prints the table and
writes it as JSON with ``--json``; each stage's progress goes to stderr (a
tqdm bar on a terminal, plain lines in a log).
"""

from __future__ import annotations

import argparse
import functools
import json
from dataclasses import replace
from typing import TYPE_CHECKING

from capfilt.scores import ITM_THRESHOLD
from capfilt.console_progress import progress
from capfilt.help_format import HelpWithDefaults
from capfilt.shapes.captions import ERRORS, caption_errors, describe, is_correct
from capfilt.shapes.negatives import ATTRIBUTE_SWAPS, possible_swaps, swapped
from capfilt.shapes.rerender import rerender
from capfilt.shapes.scene import Scene
from capfilt.shapes.splits import Sample, iter_split
from capfilt.shapes.web import KINDS
from capfilt.shapes.world import RELATIONS

# torch, transformers and the models are imported where they run: `capfilt evaluate --help` needs none of them.
if TYPE_CHECKING:
    from capfilt.captioner import Captioner
    from capfilt.filter import Filter


def _no_grad(function):
    """``torch.no_grad()`` as a decorator, with torch imported at the call."""
    @functools.wraps(function)
    def run(*args, **kwargs):
        import torch

        with torch.no_grad():
            return function(*args, **kwargs)
    return run

EVALUATION_SEED = 20221  # a seed no training split of `make demo-models` uses
METHODS = ("greedy", "beam", "nucleus")
RENDERINGS = ("plain", "changed")  # --rendering: capfilt's renderer, or the second one of capfilt.shapes.rerender
def _batches(samples: list[Sample], size: int, what: str | None = None):
    """``samples`` in batches of ``size``; with ``what``, their progress on stderr (``progress``)."""
    with progress(len(samples), what) as advance:
        for start in range(0, len(samples), size):
            batch = samples[start : start + size]
            yield batch
            advance(len(batch))


def scene_type(scene: Scene) -> str:
    """``one object`` or ``two objects``: the rows of the caption table."""
    return "one object" if len(scene.objects) == 1 else "two objects"


def evaluate_filter(filter_: Filter, samples: list[Sample], threshold: float = ITM_THRESHOLD,
                    batch_size: int = 64, show_progress: bool = False) -> dict:
    """Per web-text kind: how many texts and the fraction removed (ITM match probability < threshold).

    Each kind's entry also splits by scene type (``by_scene``), and ``partial``
    by the attribute its text changed (``by_attribute``: size, colour, shape
    or relation, read with ``caption_errors``), to show what the filter sees.
    ``show_progress``: on stderr (``progress``), as for every ``evaluate_*``.
    """
    by_scene: dict[str, dict[str, list[bool]]] = {kind: {} for kind in KINDS}
    by_attribute: dict[str, list[bool]] = {}
    for batch in _batches(samples, batch_size, "filter, web texts" if show_progress else None):
        scores = filter_.score([s.image for s in batch], [[s.text] for s in batch])
        for sample, (score,) in zip(batch, scores):
            noise = score.is_noise(threshold)
            by_scene[sample.kind].setdefault(scene_type(sample.scene), []).append(noise)
            if sample.kind == "partial":
                (changed,) = caption_errors(sample.text, sample.scene)  # a partial text changes one attribute
                by_attribute.setdefault(changed, []).append(noise)
    results = {kind: {**_rate([flag for flags in by_scene[kind].values() for flag in flags]),
                      "by_scene": {name: _rate(flags) for name, flags in sorted(by_scene[kind].items())}}
               for kind in KINDS}
    results["partial"]["by_attribute"] = {name: _rate(by_attribute[name]) for name in ERRORS if name in by_attribute}
    return results


def evaluate_swaps(filter_: Filter, samples: list[Sample], threshold: float = ITM_THRESHOLD,
                   batch_size: int = 64, show_progress: bool = False) -> dict:
    """The filter on each two-object scene's caption and its swaps, per swap: ``objects`` (B first, same relation:
    the relation the wrong way round) and each attribute where the objects differ.

    ``true_higher``: the fraction where the true caption's match probability is
    higher than the swap's (chance 50%); ``removed``: the fraction of swaps
    scored as noise. Scenes with two objects alike in every attribute are skipped.
    """
    tally: dict[str, list[tuple[bool, bool]]] = {}
    two = [s for s in samples if s.scene.relation is not None]
    for batch in _batches(two, batch_size, "filter, two-object swaps" if show_progress else None):
        truths = [describe(sample.scene) for sample in batch]
        swaps = [[(kind, str(swapped(truth, kind))) for kind in possible_swaps(truth)] for truth in truths]
        scores = filter_.score([s.image for s in batch],
                               [[str(truth)] + [t for _, t in sw] for truth, sw in zip(truths, swaps)])
        for sw, (true, *rest) in zip(swaps, scores):
            for (kind, _), score in zip(sw, rest):
                tally.setdefault(kind, []).append((true.itm > score.itm, score.is_noise(threshold)))
    return {kind: {"n": len(pairs), "true_higher": sum(h for h, _ in pairs) / len(pairs),
                   "removed": sum(r for _, r in pairs) / len(pairs)}
            for kind in ("objects", *ATTRIBUTE_SWAPS) if (pairs := tally.get(kind))}


def _rate(flags: list[bool]) -> dict:
    return {"n": len(flags), "removed": sum(flags) / len(flags) if flags else None}


def evaluate_captioner(captioner: Captioner, samples: list[Sample], methods=METHODS, batch_size: int = 64,
                       seed: int = 0, show_progress: bool = False) -> dict:
    """Per method and scene type: how many scenes, the fraction captioned correctly, a few wrong captions and,
    under ``errors``, the fraction of captions that get each part wrong (``caption_errors``: an attribute counts
    once per caption even when both phrases get it wrong)."""
    results = {}
    original = captioner.settings
    try:
        for method in methods:
            captioner.settings = replace(original, method=method)
            tally: dict[str, dict] = {}
            what = f"captioner, {method}" if show_progress else None
            for number, batch in enumerate(_batches(samples, batch_size, what)):
                captions = captioner.caption([s.image for s in batch], seed=seed + number)
                for sample, (text,) in zip(batch, captions):
                    entry = tally.setdefault(scene_type(sample.scene), {"n": 0, "correct": 0, "wrong": [],
                                                                         "errors": dict.fromkeys(ERRORS, 0)})
                    entry["n"] += 1
                    errors = caption_errors(text, sample.scene)
                    if not errors:
                        entry["correct"] += 1
                    elif len(entry["wrong"]) < 5:
                        entry["wrong"].append({"caption": text, "truth": sample.text})
                    for error in set(errors):
                        entry["errors"][error] += 1
            results[method] = {kind: {"n": e["n"], "correct": e["correct"] / e["n"], "wrong": e["wrong"],
                                      "errors": {name: count / e["n"] for name, count in e["errors"].items()}}
                               for kind, e in sorted(tally.items())}
    finally:
        captioner.settings = original
    return results


@_no_grad
def evaluate_relation(captioner: Captioner, samples: list[Sample], batch_size: int = 64,
                      show_progress: bool = False) -> dict:
    """Does the captioner see where things are? The relation word it ranks first, teacher-forced.

    For each two-object scene the decoder reads its prompt and object A's
    phrase (the canonical first half of the caption), and the four relations'
    first words are compared at the next position. ``correct``: the fraction
    where the true relation ranks first (chance 25%); ``axis``: where the
    top-ranked one is on the right axis, horizontal or vertical (chance 50%);
    ``predicted``: how often each relation ranks first. Unlike the caption
    table this isolates the relation from the attributes and decoding.
    """
    import torch

    from capfilt.device import autocast

    tokenizer, model = captioner.tokenizer, captioner.model
    words = {relation: tokenizer(relation.split(" ")[0], add_special_tokens=False).input_ids[0]
             for relation in RELATIONS}
    if len(set(words.values())) != len(RELATIONS):
        raise ValueError(f"the tokenizer does not give the relations distinct first tokens: {words}")
    two = [s for s in samples if s.scene.relation is not None]
    ranked = []
    for batch in _batches(two, batch_size, "captioner, relation" if show_progress else None):
        # The captioner's own decoding start ([DEC] + prompt), then object A's phrase, right-padded.
        phrases = tokenizer([str(describe(s.scene).phrases[0]) for s in batch], add_special_tokens=False,
                            padding=True, return_tensors="pt")
        start = captioner.prompt_ids.expand(len(batch), -1)
        input_ids = torch.cat([start, phrases["input_ids"]], dim=1)
        attention_mask = torch.cat([torch.ones_like(start), phrases["attention_mask"]], dim=1)
        last = attention_mask.sum(1) - 1  # the phrase's last token
        with autocast(captioner.device, captioner.precision):
            image_embeds = model.vision_model(pixel_values=captioner.preprocess([s.image for s in batch]).to(
                captioner.device)).last_hidden_state
            logits = model.text_decoder(
                input_ids=input_ids.to(captioner.device), attention_mask=attention_mask.to(captioner.device),
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=captioner.device),
            ).logits
        scores = logits[torch.arange(len(batch)), last.to(logits.device)][:, list(words.values())]
        ranked += [RELATIONS[int(i)] for i in scores.argmax(1)]
    axis = {"left of": "horizontal", "right of": "horizontal", "above": "vertical", "below": "vertical"}
    n = len(two)
    return {
        "n": n,
        "correct": sum(r == s.scene.relation for r, s in zip(ranked, two)) / n if n else None,
        "axis": sum(axis[r] == axis[s.scene.relation] for r, s in zip(ranked, two)) / n if n else None,
        "predicted": {relation: ranked.count(relation) / n if n else None for relation in RELATIONS},
    }


@_no_grad
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
    from capfilt.device import autocast

    with autocast(filter_.device, filter_.precision):  # as Filter.score runs
        return _retrieval(filter_, samples, rerank_k, batch_size)


def _retrieval(filter_: Filter, samples: list[Sample], rerank_k: int, batch_size: int) -> dict:
    import torch
    import torch.nn.functional as F

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


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def table(filter_results: dict | None, captioner_results: dict | None) -> str:
    """The results as Markdown tables (docs/demo.md quotes them): per kind and scene type, then what goes wrong."""
    lines = []
    if filter_results:
        scenes = sorted({name for r in filter_results.values() for name in r.get("by_scene", {})})
        lines += ["| web-text kind | texts | removed | " + " | ".join(f"{name}: removed (n)" for name in scenes) + " |",
                  "| --- | --- | --- |" + " --- |" * len(scenes)]
        for kind, r in filter_results.items():
            if r["n"]:
                cells = [f"{_percent(r['by_scene'][name]['removed'])} ({r['by_scene'][name]['n']})"
                         if name in r.get("by_scene", {}) else "-" for name in scenes]
                lines.append(f"| {kind} | {r['n']} | {_percent(r['removed'])} | " + " | ".join(cells) + " |")
        attributes = filter_results.get("partial", {}).get("by_attribute", {})
        if attributes:
            lines += ["", "| partial text, attribute changed | texts | removed |", "| --- | --- | --- |"]
            lines += [f"| {name} | {r['n']} | {_percent(r['removed'])} |" for name, r in attributes.items()]
        lines.append("")
    if captioner_results:
        kinds = sorted({kind for method in captioner_results.values() for kind in method})
        lines += ["| decoding | " + " | ".join(f"{k} correct" for k in kinds) + " |",
                  "| --- |" + " --- |" * len(kinds)]
        for method, by_kind in captioner_results.items():
            cells = [f"{by_kind[k]['correct']:.1%} (n={by_kind[k]['n']})" if k in by_kind else "-" for k in kinds]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        errors = [name for name in ERRORS if any(r.get("errors", {}).get(name) for m in captioner_results.values()
                                                 for r in m.values())]
        if errors:
            lines += ["", "Share of captions with each error (a caption can have several):", "",
                      "| decoding | scene | " + " | ".join(errors) + " |",
                      "| --- | --- |" + " --- |" * len(errors)]
            for method, by_kind in captioner_results.items():
                for kind, r in by_kind.items():
                    lines.append(f"| {method} | {kind} | " + " | ".join(_percent(r["errors"][name]) for name in errors)
                                 + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capfilt evaluate", description=__doc__.split("\n")[0],
                                     formatter_class=HelpWithDefaults,
                                     epilog="At least one of --captioner and --filter is needed.")
    parser.add_argument("--captioner", default=None, help="model reference (e.g. demo); omit to skip")
    parser.add_argument("--filter", default=None, help="model reference (e.g. demo); omit to skip")
    parser.add_argument("--n", type=int, default=1000, help="web pairs to score / scenes to caption")
    parser.add_argument("--seed", type=int, default=EVALUATION_SEED, help="seed of the fresh web split")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                        help="the captioner's decoding methods")
    parser.add_argument("--rendering", default="plain", choices=RENDERINGS,
                        help="plain: the images as capfilt's renderer draws them; changed: the same scenes drawn by "
                             "a second renderer with other edges, colours, sizes and compression (rerender.py)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.captioner or args.filter):
        parser.error("nothing to evaluate: give --captioner MODEL and/or --filter MODEL (e.g. --captioner demo "
                     "--filter demo, the shipped demo models)")
    if args.n < 1:
        parser.error(f"--n must be at least 1, not {args.n}")
    from transformers.utils import logging as hf_logging

    from capfilt.captioner import Captioner
    from capfilt.filter import Filter

    hf_logging.disable_progress_bar()  # no "Loading weights" bars: this command's own progress is what to read
    try:  # the models first: a wrong reference fails before the split is rendered
        filter_ = Filter.load(args.filter, device=args.device) if args.filter else None
        captioner = Captioner.load(args.captioner, device=args.device) if args.captioner else None
    except (ValueError, FileNotFoundError) as error:  # CheckpointError is a ValueError
        parser.exit(2, f"capfilt evaluate: error: {error}\n")
    if filter_ is not None and filter_.judged_by != "itm":  # the tables count removals at the ITM threshold
        parser.exit(2, f"capfilt evaluate: error: --filter {args.filter} is a {filter_.family} model with no ITM "
                       "head; evaluate scores filters by their ITM match probability (BLIP, BLIP-2's Q-Former)\n")
    with progress(args.n, f"rendering {args.n} web pairs (seed {args.seed}, {args.rendering})") as advance:
        samples = []
        for sample in iter_split("web", args.n, args.seed):
            samples.append(rerender(sample, args.seed) if args.rendering == "changed" else sample)
            advance(1)
    filter_results = evaluate_filter(filter_, samples, show_progress=True) if filter_ else None
    swaps = evaluate_swaps(filter_, samples, show_progress=True) if filter_ else None
    captioner_results = evaluate_captioner(captioner, samples, args.methods, show_progress=True) \
        if captioner else None
    # the teacher-forced probe reads BLIP's decoder ([DEC] + prompt): BLIP captioners only
    relation = evaluate_relation(captioner, samples, show_progress=True) \
        if captioner and captioner.family == "blip" else None
    print(table(filter_results, captioner_results))
    if swaps:
        print("\nTwo-object captions against their swaps (filter): " + "; ".join(
            f"{kind} (n={r['n']}) true higher {r['true_higher']:.1%}, swap removed {r['removed']:.1%}"
            for kind, r in swaps.items()))
    if relation:
        print(f"\nRelation ranked first after prompt + object A's phrase (teacher-forced, n={relation['n']}): "
              f"{relation['correct']:.1%} correct (chance 25%), {relation['axis']:.1%} on the right axis "
              f"(chance 50%); ranked first: " + ", ".join(f"{r} {p:.0%}" for r, p in relation["predicted"].items()))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"n": args.n, "seed": args.seed, "rendering": args.rendering, "filter": filter_results,
                       "captioner": captioner_results, "relation": relation, "swaps": swaps}, out, indent=2)


if __name__ == "__main__":
    main()
