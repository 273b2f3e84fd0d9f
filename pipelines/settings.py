"""Every knob of a CapFilt run, with the paper's defaults, in one frozen dataclass.

The CLI builds one from its flags; the Beam ``DoFn`` carries it to the
workers; its JSON (``provenance``) is written into every output file, so a
row can always say which models and which settings made it.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, fields

from capfilt.sampling_settings import SamplingSettings
from capfilt.precision import PRECISIONS
from capfilt.scores import ITM_THRESHOLD
from capfilt.pipelines.schema import SCHEMA_VERSION
from capfilt.pipelines.selection import SELECT_ALL, parse_select


@dataclass(frozen=True)
class BootstrapSettings:
    """What CapFilt does to each image.

    - ``captioner``/``filter``: model references (an HF folder, a hub id in
      the local cache, an original ``.pth`` or ``demo``); the tokenizers are
      needed only for ``.pth`` files without one beside them.
    - ``num_captions`` K = 1 and nucleus sampling with p = 0.9: the paper's
      one synthetic caption per web image. ``sampling_overrides`` holds only the
      ``SamplingSettings`` fields a run sets (e.g. ``{"top_p": 0.85}``); the
      rest are the paper's, or the captioner folder's own
      (``capfilt_sampling.json``, as the demo models carry). What a worker
      actually used is written into every output row.
    - ``threshold`` 0.5: a text whose ITM match probability is below it is
      removed (paper §3.3).
    - ``select`` ``all`` (the paper's): every text of an image that passes is
      kept; ``top-N``: the N best by ITM match probability, web and synthetic
      together (BLIP-2 kept two). Identical normalised texts of an image are
      kept once whatever it is (``capfilt.pipelines.selection``).
    - ``dedup_images`` False (the paper's): exact duplicate images (SHA-256 of
      the bytes) are counted in stats.json; True: they are also dropped, each
      image kept at its first (shard, row) with a kept text (``capfilt.pipelines.image_dedup``).
    - ``batch_size``: images per model call. It does not change what is
      written (up to float rounding): each image is captioned with its own seed.
    - ``seed``: the run's sampling seed. An image's captions are drawn with
      ``sample_seed(key)``, from the seed and the row's key only, so a rerun,
      another batch size or the same rows downloaded in another order write the
      same captions (up to float rounding) on the same kind of device (CPU and
      CUDA generators differ: ``capfilt.row_sampler.RowSampler``); another seed
      writes other, equally valid, samples.
    - ``min_image_size``: images with a side shorter than this (tracking
      pixels, icons) fail at stage ``size``; ``max_image_pixels``: larger
      images fail there too instead of exhausting a worker's memory.
    """

    captioner: str = "demo"
    filter: str = "demo"
    captioner_tokenizer: str | None = None
    filter_tokenizer: str | None = None
    device: str = "auto"  # auto: CUDA when present (each worker of a node on its own GPU), else CPU
    precision: str = "auto"  # auto: bf16 autocast on CUDA and on CPUs with native bf16, else fp32 (capfilt.device)
    torch_threads: int | None = None  # per worker; None: torch's default (all cores)
    decode_threads: int = 4  # per worker: decode and resize images ahead of the models; 0: in the models' thread
    num_captions: int = 1
    sampling_overrides: dict = field(default_factory=dict)  # SamplingSettings fields the run sets
    threshold: float = ITM_THRESHOLD
    select: str = SELECT_ALL  # all, or top-N: which passing texts of an image are kept
    dedup_images: bool = False  # drop exact duplicate images (they are always counted)
    batch_size: int = 32
    seed: int = 0
    min_image_size: int = 8
    max_image_pixels: int = 50_000_000

    def __post_init__(self):
        if self.num_captions < 1:
            raise ValueError(f"num_captions (K) must be at least 1, not {self.num_captions}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold is a probability in [0, 1], not {self.threshold}")
        if self.decode_threads < 0:
            raise ValueError(f"decode_threads must be 0 or more, not {self.decode_threads}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {self.batch_size}")
        unknown = set(self.sampling_overrides) - {f.name for f in fields(SamplingSettings)}
        if unknown:
            raise ValueError(f"unknown sampling settings {sorted(unknown)}")
        SamplingSettings(**self.sampling_overrides)  # checks the values
        parse_select(self.select)

    @property
    def top_n(self) -> int | None:
        """The texts kept per image at most (``select`` top-N), None for all."""
        return parse_select(self.select)

    def provenance(self) -> dict:
        """The settings as JSON-able data, with the schema version."""
        data = asdict(self)
        # Where and how fast it ran does not change what it wrote, up to rounding (precision: docs/throughput.md).
        for where in ("device", "precision", "torch_threads", "decode_threads"):
            data.pop(where)
        return {"schema_version": SCHEMA_VERSION, **data}

    def sample_seed(self, key: str) -> int:
        """The sampling seed of the input row with this key: stable across runs, machines and Python processes.

        Rows that share a key share their seed (the same image under one key gets the same captions).
        """
        digest = hashlib.blake2b(f"{self.seed}/{key}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
        return int.from_bytes(digest, "big") & (2**63 - 1)
