"""The precisions a run may ask for (``capfilt.device`` applies them); without torch."""

PRECISIONS = ("auto", "bf16", "fp32")
