"""Web texts: one noisy text per web image, drawn by kind (docs/shapes.md).

- ``clean``: a correct caption of its own image;
- ``mismatch``: the correct caption of another scene, one that is wrong for this image;
- ``partial``: its own caption with exactly one attribute changed (a size, a
  colour, a shape or the relation), wrong for the image;
- ``alt``: uninformative alt text from templates whose words lie outside the
  world's vocabulary.
"""

from __future__ import annotations

import numpy as np

from capfilt.shapes.captions import ATTRIBUTE_VALUES, Parse, caption, describe, is_correct, replaced
from capfilt.shapes.scene import Scene, SceneConfig, sample_scene
from capfilt.shapes.world import RELATIONS

KINDS = ("clean", "mismatch", "partial", "alt")
DEFAULT_MIXTURE = {"clean": 0.45, "mismatch": 0.25, "partial": 0.15, "alt": 0.15}
ATTRIBUTES = ("size", "colour", "shape", "relation")
MAX_TRIES = 1000  # draws of a wrong text before giving up (never reached in practice)

# Alt-text templates. Fields: {n} a number, {name} a first name, {place} a city,
# {year} a year, {w}/{h} a resolution. No template word, and no fill, may be a
# word of the world's vocabulary (``a``, ``of``, ``left``, colours, ...):
# tests check every template against captions.VOCABULARY.
ALT_TEMPLATES = (
    "img_{n}.jpg",
    "IMG_{n}.JPG",
    "DSC {n}",
    "DSC_{n}.jpg",
    "image{n}.png",
    "photo_{n}.jpeg",
    "scan{n}.tif",
    "screenshot {year}-{mm}-{dd}",
    "untitled",
    "untitled-{n}",
    "untitled design ({n})",
    "click here for more",
    "click to enlarge",
    "photo by {name}",
    "image by {name} from pixabay",
    "© {year} {name}",
    "copyright {name} {year}",
    "free shipping on all orders",
    "best price guaranteed",
    "sale ends soon",
    "new arrivals",
    "shop now",
    "sign up today",
    "download now",
    "view gallery",
    "home page banner",
    "logo",
    "thumbnail",
    "placeholder",
    "image not available",
    "product photo {n}",
    "stock photo {n}",
    "wallpaper hd {w}x{h}",
    "pic {n}",
    "my trip to {place} {year}",
    "{name}'s birthday party",
    "holiday in {place}",
    "{place} skyline at night",
    "team photo {year}",
    "slide {n}",
    "page {n}",
    "fig. {n}",
    "attachment {n}",
    "profile picture",
    "cover photo",
)
ALT_NAMES = ("anna", "ben", "carlos", "dana", "emma", "farid", "grace", "hiro", "ines", "jon", "kate", "maria", "noah")
ALT_PLACES = ("paris", "tokyo", "lisbon", "berlin", "nairobi", "lima", "oslo", "seoul", "toronto", "sydney")


def draw_kind(rng: np.random.Generator, mixture: dict[str, float] = DEFAULT_MIXTURE) -> str:
    """One kind, drawn with the mixture's probabilities."""
    unknown = set(mixture) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown web-text kinds {sorted(unknown)}; kinds are {KINDS}")
    kinds = list(mixture)
    weights = np.asarray([mixture[k] for k in kinds], dtype=np.float64)
    return kinds[rng.choice(len(kinds), p=weights / weights.sum())]


def alt_text(rng: np.random.Generator) -> str:
    """An uninformative alt text from ALT_TEMPLATES with random fills."""
    template = ALT_TEMPLATES[rng.integers(len(ALT_TEMPLATES))]
    return template.format(
        n=f"{int(rng.integers(0, 10_000)):04d}",
        name=ALT_NAMES[rng.integers(len(ALT_NAMES))],
        place=ALT_PLACES[rng.integers(len(ALT_PLACES))],
        year=int(rng.integers(1998, 2026)),
        mm=f"{int(rng.integers(1, 13)):02d}",
        dd=f"{int(rng.integers(1, 29)):02d}",
        w=(640, 800, 1024, 1280, 1920)[rng.integers(5)],
        h=(480, 600, 768, 720, 1080)[rng.integers(5)],
    )


def mismatch_text(scene: Scene, rng: np.random.Generator, config: SceneConfig = SceneConfig()) -> str:
    """The correct caption of another random scene, checked to be wrong for ``scene``."""
    for _ in range(MAX_TRIES):
        text = caption(sample_scene(rng, config))
        if not is_correct(text, scene):
            return text
    raise RuntimeError("could not draw a mismatched caption")


def _change(parsed: Parse, attribute: str, rng: np.random.Generator) -> Parse:
    """``parsed`` with one attribute of one phrase (or the relation) set to another value."""
    if attribute == "relation":
        others = [r for r in RELATIONS if r != parsed.relation]
        return replaced(parsed, "relation", others[rng.integers(len(others))])
    i = int(rng.integers(len(parsed.phrases)))
    others = [v for v in ATTRIBUTE_VALUES[attribute] if v != getattr(parsed.phrases[i], attribute)]
    return replaced(parsed, attribute, others[rng.integers(len(others))], i)


def partial_text(scene: Scene, rng: np.random.Generator) -> str:
    """The scene's caption with exactly one attribute changed, checked to be wrong for ``scene``.

    The attribute kind (size, colour, shape, or relation for two objects) is
    drawn uniformly, then the object. Changing the relation of two identical
    objects to its converse leaves the caption correct; such draws are redrawn.
    """
    truth = describe(scene)
    attributes = ATTRIBUTES if truth.relation is not None else ATTRIBUTES[:3]
    for _ in range(MAX_TRIES):
        text = str(_change(truth, attributes[rng.integers(len(attributes))], rng))
        if not is_correct(text, scene):
            return text
    raise RuntimeError("could not draw a partially wrong caption")


def web_text(scene: Scene, kind: str, rng: np.random.Generator, config: SceneConfig = SceneConfig()) -> str:
    """The web text of the given kind for ``scene``."""
    if kind == "clean":
        return caption(scene)
    if kind == "mismatch":
        return mismatch_text(scene, rng, config)
    if kind == "partial":
        return partial_text(scene, rng)
    if kind == "alt":
        return alt_text(rng)
    raise ValueError(f"unknown web-text kind {kind!r}; kinds are {KINDS}")
