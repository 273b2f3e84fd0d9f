"""Which texts of an image are kept: the threshold, duplicate texts, --select top-N, duplicate images in a shard;
the engine (``selection.select``) the pipeline runs a batch at a time and refilter a shard at a time, and the
counts and report examples both take from its outcome."""

from __future__ import annotations

import random

import numpy as np
import pytest

from capfilt import cli
from capfilt.pipelines.schema import BELOW_THRESHOLD, DUPLICATE_IMAGE, DUPLICATE_TEXT, NOT_IN_TOP_N, REASONS, SOURCES
from capfilt.pipelines.selection import (
    CODES, KEPT_CODE, REASON_OF_CODE, normalise, parse_select, reasons, select,
)
from capfilt.pipelines.settings import BootstrapSettings
from capfilt.pipelines.stats import MAX_SAMPLES_PER_CELL, ImageTally, ShardStats, image_hash


def test_normalise_lowers_and_collapses_whitespace():
    assert normalise("  A  Dog\ton the\n GRASS ") == "a dog on the grass"
    assert normalise("a dog.") != normalise("a dog")  # punctuation is text


def test_parse_select():
    assert parse_select("all") is None
    assert parse_select("top-2") == 2 and parse_select("top-10") == 10
    for bad in ("top-0", "top", "top2", "2", "best-2", "top--1", ""):
        with pytest.raises(ValueError, match="'all' or 'top-N'"):
            parse_select(bad)
    with pytest.raises(ValueError, match="top-N"):
        BootstrapSettings(select="top-0")
    assert BootstrapSettings(select="top-3").top_n == 3 and BootstrapSettings().top_n is None


def test_the_threshold_removes_first_then_duplicates_then_the_top_n():
    texts = ["A dog", "a  dog ", "a cat", "a DOG", "a bird", "a fish"]
    itm = [0.40, 0.90, 0.70, 0.80, 0.95, 0.60]
    # The web text is below the threshold: it does not claim "a dog", caption 0 does; caption 2 repeats it.
    assert reasons(texts, itm, 0.5, None) == [BELOW_THRESHOLD, None, None, DUPLICATE_TEXT, None, None]
    # Top 2 of what is left, by score: "a bird" (0.95) and "a  dog " (0.90).
    assert reasons(texts, itm, 0.5, 2) == [BELOW_THRESHOLD, None, NOT_IN_TOP_N, DUPLICATE_TEXT, None, NOT_IN_TOP_N]
    # More places than texts: all are kept.
    assert reasons(texts, itm, 0.5, 9) == reasons(texts, itm, 0.5, None)


def test_of_equal_texts_the_first_in_candidate_order_is_kept_and_ties_rank_in_that_order():
    # The web text first, whatever the scores say.
    assert reasons(["a red circle", "A red circle"], [0.6, 0.9], 0.5, None) == [None, DUPLICATE_TEXT]
    # Equal scores: the earlier candidate ranks first.
    assert reasons(["one", "two", "three"], [0.7, 0.7, 0.7], 0.5, 1) == [None, NOT_IN_TOP_N, NOT_IN_TOP_N]
    assert reasons(["one", "two", "three"], [0.6, 0.7, 0.7], 0.5, 1) == [NOT_IN_TOP_N, None, NOT_IN_TOP_N]
    with pytest.raises(ValueError, match="2 texts but 1 scores"):
        reasons(["a", "b"], [0.5], 0.5, None)


def _select(settings, tally, sha: str, itm: list[float]) -> list[str | None]:
    """One image through the engine, as the pipeline's batch of one."""
    texts = [f"text {i}" for i in range(len(itm))]
    codes = select(settings, [len(itm)], itm, lambda start, stop: texts[start:stop], [sha], tally)
    return REASON_OF_CODE[codes].tolist()


@pytest.mark.parametrize("dedup", [False, True])
def test_an_image_is_kept_at_the_first_row_that_keeps_a_text_of_it(dedup):
    settings, tally = BootstrapSettings(threshold=0.5, dedup_images=dedup), ImageTally()
    a, b = "aa" * 32, "bb" * 32
    assert _select(settings, tally, a, [0.1, 0.2]) == [BELOW_THRESHOLD] * 2  # nothing kept: it does not claim a
    assert _select(settings, tally, a, [0.9, 0.2]) == [None, BELOW_THRESHOLD]  # the first row that keeps a text of it
    dropped = [DUPLICATE_IMAGE, BELOW_THRESHOLD] if dedup else [None, BELOW_THRESHOLD]
    assert _select(settings, tally, a, [0.8, 0.3]) == dropped
    assert _select(settings, tally, b, [0.8, 0.9]) == [None, None]
    assert (tally.duplicates, tally.examples) == (1, [a])  # counted either way
    assert np.frombuffer(tally.hashes_file(), "<u8").tolist() == sorted([image_hash(a), image_hash(b)])


def random_shard(rng: random.Random) -> tuple[list[int], list[str], list[float], list[str], list[str]]:
    """A shard's judged texts: texts per image, the texts, their scores (float32 values), each image's SHA-256, each
    text's source. Texts repeat once normalised, scores tie, images repeat."""
    words = ["a dog", "A dog", "a cat", "a  cat ", "a bird"]
    counts, texts, scores, shas, sources = [], [], [], [], []
    for _ in range(rng.randint(0, 12)):
        shas.append(rng.choice(["aa", "bb", "cc", "dd"]) * 32)
        web = rng.random() < 0.7
        count = rng.randint(1, 4)
        counts.append(count + web)
        sources += ["web"] * web + ["synthetic"] * count
        for _ in range(count + web):
            texts.append(rng.choice(words))
            scores.append(float(np.float32(rng.choice([0.2, 0.5, 0.7, 0.7, rng.random()]))))
    return counts, texts, scores, shas, sources


def batches(rng: random.Random, counts: list[int]) -> list[tuple[int, int, int, int]]:
    """The images cut into batches at random: (first image, end image, first text, end text) each."""
    cuts = sorted({0, len(counts), *(rng.randint(0, len(counts)) for _ in range(3))})
    ends = np.cumsum([0, *counts]).tolist()
    return [(a, b, ends[a], ends[b]) for a, b in zip(cuts, cuts[1:])]


def test_the_engine_is_the_rules_image_by_image_whatever_the_batches():
    """``select`` on a shard at once (refilter) and batch by batch (the pipeline) against rules 1-3 applied to each
    image alone (``reasons``) and rule 4 as a tally of the images with a kept text, in order."""
    rng = random.Random(5)
    for trial in range(300):
        counts, texts, scores, shas, _ = random_shard(rng)
        settings = BootstrapSettings(threshold=rng.choice([0.0, 0.5, 0.7]), select=rng.choice(["all", "top-1",
                                                                                              "top-2"]),
                                     dedup_images=rng.random() < 0.5)
        expected, seen, repeats, examples, position = [], set(), 0, [], 0
        for image, count in enumerate(counts):
            why = reasons(texts[position:position + count], scores[position:position + count], settings.threshold,
                          settings.top_n)
            if any(reason is None for reason in why):
                if image_hash(shas[image]) in seen:
                    repeats += 1
                    examples += [shas[image]] if shas[image] not in examples and len(examples) < 5 else []
                    if settings.dedup_images:
                        why = [DUPLICATE_IMAGE if reason is None else reason for reason in why]
                seen.add(image_hash(shas[image]))
            expected += why
            position += count
        whole = ImageTally()
        codes = select(settings, counts, np.array(scores, np.float32), lambda a, b: texts[a:b], shas, whole)
        assert REASON_OF_CODE[codes].tolist() == expected, trial
        assert (whole.duplicates, whole.examples) == (repeats, examples)
        assert np.frombuffer(whole.hashes_file(), "<u8").tolist() == sorted(seen)
        tally, parts = ImageTally(), []
        for first, end, start, stop in batches(rng, counts):
            parts += select(settings, counts[first:end], scores[start:stop], lambda a, b: texts[start + a:start + b],
                            shas[first:end], tally).tolist()
        assert parts == codes.tolist(), trial
        assert tally.hashes_file() == whole.hashes_file() and tally.examples == whole.examples


def test_counts_and_examples_are_the_same_in_bulk_and_text_by_text():
    """``ShardStats.add_texts`` on a batch and on a shard against one text per call; ``wanted_samples`` per batch against
    the first ``MAX_SAMPLES_PER_CELL`` texts of each source and outcome taken one at a time."""
    rng = random.Random(7)
    for trial in range(100):
        counts, texts, scores, shas, sources = random_shard(rng)
        codes = np.array([rng.randrange(len(REASONS) + 1) for _ in texts], np.int8)
        scores[:1] = [1.0] if scores else []  # the last bin holds 1.0
        one, bulk, batched = ShardStats("00000"), ShardStats("00000"), ShardStats("00000")
        taken = {(source, kept): 0 for source in SOURCES for kept in (True, False)}
        expected = []
        for i, (source, score, code) in enumerate(zip(sources, scores, codes.tolist())):
            one.add_texts([source], [score], [code])
            if taken[(source, code == KEPT_CODE)] < MAX_SAMPLES_PER_CELL:
                taken[(source, code == KEPT_CODE)] += 1
                expected.append(i)
        bulk.add_texts(sources, np.array(scores, np.float32), codes)
        chosen = []
        for _, _, start, stop in batches(rng, counts):
            batched.add_texts(sources[start:stop], scores[start:stop], codes[start:stop])
            picks = batched.wanted_samples(sources[start:stop], codes[start:stop] == KEPT_CODE)
            batched.samples += [{"source": sources[start + i], "kept": bool(codes[start + i] == KEPT_CODE)}
                                for i in picks]
            chosen += [start + i for i in picks]
        assert chosen == expected, trial
        for stats in (bulk, batched):
            assert (stats.kept, stats.rejected, stats.histogram) == (one.kept, one.rejected, one.histogram)
            assert {k: v for k, v in stats.reasons.items() if v} == {k: v for k, v in one.reasons.items() if v}
        assert sum(one.histogram["web"]) + sum(one.histogram["synthetic"]) == len(texts)
    with pytest.raises(ValueError, match="unknown sources"):
        ShardStats("00000").add_texts(["human"], [0.5], [CODES[BELOW_THRESHOLD]])


def test_the_cli_spells_the_settings():
    args = cli.build_parser().parse_args(["bootstrap", "--select", "top-2", "--dedup-images"])
    settings = cli.settings_from_args(args)
    assert (settings.select, settings.top_n, settings.dedup_images) == ("top-2", 2, True)
    defaults = cli.settings_from_args(cli.build_parser().parse_args(["bootstrap"]))
    assert (defaults.select, defaults.dedup_images) == ("all", False)
    provenance = settings.provenance()
    assert provenance["select"] == "top-2" and provenance["dedup_images"] is True


def test_a_bad_select_is_a_usage_error(tmp_path, capsys):
    code = cli.main(["bootstrap", "--out", str(tmp_path / "out"), "--select", "top-0"])
    assert code == cli.EXIT_USAGE
    assert "select must be 'all' or 'top-N'" in capsys.readouterr().err
