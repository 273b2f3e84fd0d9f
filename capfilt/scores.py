"""A filter's judgement of an (image, text) pair, and the paper's threshold on it; without torch."""

from __future__ import annotations

from dataclasses import dataclass

ITM_THRESHOLD = 0.5  # paper §3.3: a text is noise when its match probability is below 0.5


@dataclass(frozen=True)
class TextScore:
    """The filter's judgement of one (image, text) pair."""

    itm: float | None  # ITM match probability; None from a filter without an ITM head (CLIP, SigLIP)
    itc: float  # ITC cosine similarity

    def is_noise(self, threshold: float = ITM_THRESHOLD) -> bool:
        """Whether the ITM probability is below ``threshold``; a filter without ITM judges by ``itc`` instead."""
        if self.itm is None:
            raise ValueError("this filter has no ITM head: judge by the ITC similarity (itc) instead")
        return self.itm < threshold
