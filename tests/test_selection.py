"""Which texts of an image are kept: the threshold, duplicate texts, --select top-N, duplicate images in a shard."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from capfilt import cli
from capfilt.pipelines.process import Judged, ShardJob
from capfilt.pipelines.schema import BELOW_THRESHOLD, DUPLICATE_IMAGE, DUPLICATE_TEXT, NOT_IN_TOP_N
from capfilt.pipelines.selection import normalise, parse_select, reasons
from capfilt.pipelines.settings import BootstrapSettings
from capfilt.pipelines.stats import ShardStats


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


def _select(job, sha: str, itm: list[float]) -> list[str | None]:
    judged = Judged(row=None, image=None, sha256=sha)
    return ShardJob.select(job, judged, [f"text {i}" for i in range(len(itm))], itm)


@pytest.mark.parametrize("dedup", [False, True])
def test_an_image_is_kept_at_the_first_row_that_keeps_a_text_of_it(dedup):
    job = SimpleNamespace(settings=BootstrapSettings(threshold=0.5, dedup_images=dedup), stats=ShardStats("00000"))
    a, b = "aa" * 32, "bb" * 32
    assert _select(job, a, [0.1, 0.2]) == [BELOW_THRESHOLD] * 2  # nothing kept: it does not claim the image
    assert _select(job, a, [0.9, 0.2]) == [None, BELOW_THRESHOLD]  # the first row that keeps a text of it
    dropped = [DUPLICATE_IMAGE, BELOW_THRESHOLD] if dedup else [None, BELOW_THRESHOLD]
    assert _select(job, a, [0.8, 0.3]) == dropped
    assert _select(job, b, [0.8, 0.9]) == [None, None]
    assert (job.stats.kept_images.duplicates, job.stats.kept_images.examples) == (1, [a])  # counted either way


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
