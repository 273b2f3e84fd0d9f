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
from capfilt.pipelines.selection import BY_ITM, SCORE_NAMES, SCORE_RANGES, SELECT_ALL, parse_select

BLIP = "blip"  # capfilt.model_kind.BLIP, without importing torch
AUTO_FAMILY = "auto"  # a family the command line could not read (the model is on a remote runner's workers only)


@dataclass(frozen=True)
class BootstrapSettings:
    """What CapFilt does to each image.

    - ``captioner``/``filter``: model references (an HF folder, a hub id in
      the local cache, an original ``.pth`` or ``demo``); the tokenizers are
      needed only for ``.pth`` files without one beside them.
    - ``num_captions`` K = 1 and nucleus sampling with p = 0.9: the paper's
      one synthetic caption per web image. ``sampling_overrides`` holds only the
      sampling fields a run sets (e.g. ``{"top_p": 0.85}``): ``SamplingSettings``'
      for a BLIP captioner, ``capfilt.blip2.LmSamplingSettings``' for the
      others (whose values ``capfilt.families.sampling_settings`` checks); the
      rest are the paper's (or the family's), or the captioner folder's own
      (``capfilt_sampling.json``, as the demo models carry). What a worker
      actually used is written into every output row.
    - ``by`` ``itm`` (the paper's): the score that the threshold (rule 1) and
      ``select`` top-N's ranking use is the filter's ITM match probability;
      ``itc``: its ITC cosine similarity, for a filter without an ITM head
      (CLIP, SigLIP: ``judged_by`` ``itc``), or to judge a BLIP filter by ITC.
      A filter without an ITM head in an ``itm`` run fails the job at load.
    - ``captioner_family``/``filter_family`` ``blip``: the models' families
      (``capfilt.model_kind``), as the command line read them from their
      config.json; a worker refuses models of other families (a folder that
      changed under a running job), and they are part of every row's config.
      ``auto``: not readable where the job was set up (a model only a remote
      runner's workers hold); the worker takes the family of what it loads.
    - ``threshold`` 0.5: a text whose score is below it is removed (paper
      §3.3: the ITM match probability, in [0, 1]; by ``itc`` a cosine in
      [-1, 1]). None: no threshold, every text passes rule 1; only with
      ``select`` top-N (BLIP-2's recipe ranks by CLIP similarity alone).
    - ``select`` ``all`` (the paper's): every text of an image that passes is
      kept; ``top-N``: the N best by the ``by`` score, web and synthetic
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
    sampling_overrides: dict = field(default_factory=dict)  # sampling fields the run sets (the captioner family's)
    by: str = BY_ITM  # the score rule 1 and top-N use: itm (the paper's) or itc
    captioner_family: str = BLIP  # capfilt.model_kind's family of the captioner (the command line reads it)
    filter_family: str = BLIP  # and of the filter
    threshold: float | None = ITM_THRESHOLD  # None: no threshold (select top-N only)
    select: str = SELECT_ALL  # all, or top-N: which passing texts of an image are kept
    dedup_images: bool = False  # drop exact duplicate images (they are always counted)
    batch_size: int = 32
    seed: int = 0
    min_image_size: int = 8
    max_image_pixels: int = 50_000_000

    def __post_init__(self):
        if self.num_captions < 1:
            raise ValueError(f"num_captions (K) must be at least 1, not {self.num_captions}")
        if self.by not in SCORE_RANGES:
            raise ValueError(f"by must be one of {tuple(SCORE_RANGES)}, not {self.by!r}")
        if self.threshold is None:
            if parse_select(self.select) is None:
                raise ValueError("no threshold (None) needs select top-N: with select all every text would be kept")
        else:
            low, high = SCORE_RANGES[self.by]
            if not low <= self.threshold <= high:
                raise ValueError(f"a threshold on the {SCORE_NAMES[self.by]} is in [{low:g}, {high:g}], "
                                 f"not {self.threshold}")
        if self.decode_threads < 0:
            raise ValueError(f"decode_threads must be 0 or more, not {self.decode_threads}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {self.batch_size}")
        if BLIP != self.captioner_family or BLIP != self.filter_family:
            from capfilt.model_kind import FAMILY_OF_MODEL_TYPE  # torch: only for a run with another family

            for role, family in (("captioner", self.captioner_family), ("filter", self.filter_family)):
                if family not in (*FAMILY_OF_MODEL_TYPE.values(), AUTO_FAMILY):
                    raise ValueError(f"{role}_family must be one of {sorted(set(FAMILY_OF_MODEL_TYPE.values()))}, "
                                     f"not {family!r}")
        parse_select(self.select)
        if self.captioner_family == BLIP:
            known = {f.name for f in fields(SamplingSettings)}
        else:  # a language model behind a Q-Former; its values are checked by capfilt.families.sampling_settings
            from capfilt.blip2 import LmSamplingSettings  # torch: only for such a captioner

            known = {f.name for f in fields(LmSamplingSettings)}
            if self.captioner_family == AUTO_FAMILY:  # either kind: the worker checks them for what it loads
                known |= {f.name for f in fields(SamplingSettings)}
        unknown = set(self.sampling_overrides) - known
        if unknown:
            raise ValueError(f"unknown sampling settings {sorted(unknown)} for a {self.captioner_family} captioner")
        if self.captioner_family == BLIP:
            SamplingSettings(**self.sampling_overrides)  # checks the values

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
