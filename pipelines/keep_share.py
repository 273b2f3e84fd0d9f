"""Whether the filter's keep share of a source looks wrong: under 1% or over 99% of its judged texts.

The command line warns (or, with ``--strict``, exits 4) by it, and the report and ``stats.json`` show the same
warnings, for bootstrap and refilter alike.
"""

from __future__ import annotations

from capfilt.pipelines.schema import BELOW_THRESHOLD
from capfilt.pipelines.selection import BY_ITM, SCORE_NAMES

# A source (web texts, synthetic captions) of which the filter kept under 1% or over 99% is suspicious, once enough
# of its texts were judged for one text to weigh less than 1%.
KEEP_SHARE_LOW, KEEP_SHARE_HIGH, KEEP_SHARE_MIN_TEXTS = 0.01, 0.99, 100


def keep_share_warnings(stats: dict, settings) -> list[str]:
    """What a keep share under 1% or over 99% likely means, per source (web texts, synthetic captions).

    Per source, not pooled: the two fail differently (web texts: the data, the filter or the threshold;
    synthetic captions: the captioner too), and a pooled share hides one source at 0% beside the other at 40%.
    A source with fewer than ``KEEP_SHARE_MIN_TEXTS`` texts judged is not checked: one text would be over 1%.
    The share is the filter's: texts removed as duplicates or by ``--select`` passed it. A run without a threshold
    (``select`` top-N alone) removes no text as noise by design: nothing to warn about. ``settings``: ``threshold``,
    ``by`` (the score it applies to; ``itm`` when absent), ``captioner``, ``filter``.
    """
    if settings.threshold is None:
        return []
    by = getattr(settings, "by", None) or BY_ITM
    flag = f"--threshold {settings.threshold}" if by == BY_ITM else \
        f"--threshold {settings.threshold} (by {by}: on the {SCORE_NAMES[by]})"
    lowest = "0 keeps every text" if by == BY_ITM else "-1 keeps every text"
    warnings = []
    for source, what in (("web", "web texts"), ("synthetic", "synthetic captions")):
        judged = stats["texts"][source]
        if judged < KEEP_SHARE_MIN_TEXTS:
            continue
        share = 1 - stats["rejected_reasons"][BELOW_THRESHOLD][source] / judged
        kept = f"the filter kept {100 * share:.1f}% of the {judged} {what} it judged"
        if share < KEEP_SHARE_LOW:
            cause = ("the captioner likely writes captions that do not describe these images (a .pth captioner "
                     "with the wrong tokenizer writes nonsense), or the captioner and filter do not belong together"
                     if source == "synthetic" else "the filter likely does not know these images or texts")
            warnings.append(
                f"{kept} (under {KEEP_SHARE_LOW:.0%}): {cause}; the demo models know only the shapes world (give "
                f"--captioner and --filter for real photos); or {flag} is too high for "
                f"this filter (captioner {settings.captioner}, filter {settings.filter}). Look at rejected/ and "
                "report.html before training on kept/")
        elif share > KEEP_SHARE_HIGH:
            warnings.append(
                f"{kept} (over {KEEP_SHARE_HIGH:.0%}): the filter removes next to nothing: {flag} is likely too "
                f"low ({lowest}), or the filter scores every pair "
                f"alike (a model mismatch: an untrained or wrong filter {settings.filter}). Look at kept/ and "
                "report.html before training on it")
    return warnings
