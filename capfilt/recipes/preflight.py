"""Every check of a ``capfilt bootstrap`` that can fail before the job, made before it, all at once.

A new user's mistakes (a model folder of the wrong kind, a URL list whose caption column is not found, a list that
changed since its shards were made, an OUT of another run's settings) would otherwise show one per run, each after
seconds of start-up, some only after Beam started and OUT was claimed. ``check`` makes them all, reading only, and
raises one ``PreflightError`` listing each problem on a line of its own with its fix. Nothing is written (no OUT, no
shards folder, no URL list) until every check passes.
"""

from __future__ import annotations

from pathlib import Path

from capfilt.ingest import datasets
from capfilt.ingest.url_list import DatasetError
from capfilt.pipelines import dask_cluster
from capfilt.recipes import bootstrap as recipe
from capfilt.recipes.bootstrap import BootstrapRun, UsageError


class PreflightError(UsageError):
    """Problems found before the job, one line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        head = "1 problem" if len(problems) == 1 else f"{len(problems)} problems"
        lines = ("\n    ".join(line for line in p.splitlines() if line.strip()) for p in problems)  # one item each
        super().__init__(f"{head}; nothing was started or written:\n" + "\n".join(f"  - {p}" for p in lines))


def check(job: BootstrapRun) -> datasets.DemoInput | datasets.ShardsInput | datasets.UrlListInput:
    """What DATA names, once every check passed (for ``capfilt.recipes.bootstrap.run``)."""
    from capfilt.pipelines.bootstrap import runs_locally

    problems: list[str] = list(job.problems)
    models_here = runs_locally(job.runner, job.beam_options)  # the workers read this machine's model paths
    if dask_cluster.is_dask(job.runner):
        try:
            dask_cluster.check_installed()
        except ImportError as error:
            problems.append(str(error))
    if models_here:
        problems += model_problems(job)
    source, found = data_problems(job.data, job.cache_dir, job.columns, job.fetch)
    problems += found
    if source is not None and not isinstance(source, datasets.ShardsInput):
        problems += shards_folder_problems(job, source)
    problems += output_problems(job)
    if problems:
        raise PreflightError(problems)
    return source


def data_problems(data: str, cache_dir: str, columns, fetch: bool | None) -> tuple[object, list[str]]:
    """What DATA names (None when it names nothing readable) and, if so, why not: its columns are detected here."""
    try:
        return datasets.resolve(data, cache_dir, columns, fetch=fetch), []
    except (DatasetError, UsageError, FileNotFoundError) as error:
        return None, [f"DATA={data}: {error}" if str(data) not in str(error) else str(error)]


def model_problems(job: BootstrapRun) -> list[str]:
    """Each model exists, is of the kind its role takes and has a tokenizer (``capfilt.model_kind``), and the run's
    sampling settings are ones its captioner's family takes (``capfilt.families.sampling_settings``)."""
    settings = job.settings
    problems = role_problems(((settings.captioner, settings.captioner_tokenizer),
                              (settings.filter, settings.filter_tokenizer)))
    if not problems:
        problems += sampling_problems(settings.captioner, settings.captioner_tokenizer, settings.sampling_overrides)
    return problems


def role_problems(models) -> list[str]:
    """``models``: the captioner's and the filter's (reference, tokenizer); a line for each that cannot take its
    role."""
    from capfilt.checkpoints import CAPTIONER, FILTER, CheckpointError
    from capfilt.model_kind import check_role

    problems = []
    for (ref, tokenizer), role in zip(models, (CAPTIONER, FILTER)):
        try:
            check_role(ref, role, tokenizer)
        except CheckpointError as error:
            problems.append(f"--{role} {ref}: {error}")
    return problems


def sampling_problems(captioner: str, tokenizer: str | None, overrides: dict) -> list[str]:
    """The sampling flags' values as the captioner's family takes them (its defaults and folder's own included)."""
    from capfilt.families import sampling_settings

    try:
        sampling_settings(captioner, tokenizer, **overrides)
    except ValueError as error:  # CheckpointError is a ValueError
        return [f"--captioner {captioner}: its sampling settings: {error}"]
    return []


def judging_problems(filter_: str, family: str | None, by: str, threshold: float | None, select: str) -> list[str]:
    """A judging choice the filter cannot take: by ITM without an ITM head, or no threshold and no top-N."""
    from capfilt.model_kind import ITC_ONLY, NAMES
    from capfilt.pipelines.selection import BY_ITC, BY_ITM, parse_select

    headless = family in ITC_ONLY
    if headless and by == BY_ITM:
        return [f"--filter {filter_}: a {NAMES[family]} model has no ITM head; it judges by its image-text "
                f"similarity (--by {BY_ITC}, or leave --by out)"]
    try:
        ranked = parse_select(select) is not None
    except ValueError:
        return []  # BootstrapSettings names a bad --select
    if threshold is None and not ranked:
        what = f"--filter {filter_}: a {NAMES[family]} model has no ITM head, so" if headless else f"--by {BY_ITC}:"
        return [f"{what} there is no default threshold on its cosine similarity: give one (--by {BY_ITC} "
                "--threshold T, T in [-1, 1]) or rank the texts of each image by it with --select top-N (no "
                "threshold)"]
    return []


def instruction_problems(captioner: str, family: str | None, instruction: str | None) -> list[str]:
    """``--instruction`` with a captioner that reads none (every family but InstructBLIP)."""
    from capfilt.model_kind import INSTRUCTBLIP, NAMES

    if instruction is None or family in (INSTRUCTBLIP, None):
        return []
    return [f"--instruction is for an InstructBLIP captioner; --captioner {captioner} is a {NAMES[family]} model, "
            "which reads no instruction (leave --instruction out)"]


def shards_folder_problems(job: BootstrapRun, source) -> list[str]:
    """The folder the demo renders or img2dataset downloads into holds no shards of another input."""
    try:
        folder = recipe.shards_folder(job)
    except UsageError as error:
        return [str(error)]
    if isinstance(source, datasets.DemoInput):
        params = recipe.demo_params(job.demo)
    else:
        params = recipe.download_params(source, job.download, job.keep_columns)
    conflict = recipe.source_conflict(Path(folder), params)
    return [conflict] if conflict else []


def output_problems(job: BootstrapRun) -> list[str]:
    """OUT holds no output of a run with other settings (read only: OUT is claimed when the job starts)."""
    from capfilt.pipelines.layout import OutputLayout, SettingsMismatchError

    try:
        OutputLayout(job.out).check_claim(job.settings.provenance())
    except SettingsMismatchError as error:
        return [str(error)]
    return []
