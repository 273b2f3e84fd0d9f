"""Where the shipped demo models are: the captioner and the filter that ``demo`` names (docs/demo.md)."""

from pathlib import Path

DEMO_MODELS = Path(__file__).parent / "demo_models"
