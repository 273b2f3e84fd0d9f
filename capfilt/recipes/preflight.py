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
        super().__init__(f"{head}; nothing was started or written:\n" + "\n".join(f"  - {p}" for p in problems))


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
    source = None
    try:
        source = datasets.resolve(job.data, job.cache_dir, job.columns, fetch=job.fetch)
    except (DatasetError, UsageError, FileNotFoundError) as error:
        problems.append(f"DATA={job.data}: {error}" if str(job.data) not in str(error) else str(error))
    if source is not None and not isinstance(source, datasets.ShardsInput):
        problems += shards_folder_problems(job, source)
    problems += output_problems(job)
    if problems:
        raise PreflightError(problems)
    return source


def model_problems(job: BootstrapRun) -> list[str]:
    """Each model exists, is of the kind its role takes, and has a tokenizer (``capfilt.model_kind``)."""
    from capfilt.checkpoints import CAPTIONER, FILTER, CheckpointError
    from capfilt.model_kind import check_role

    settings = job.settings
    problems = []
    for ref, role, tokenizer in ((settings.captioner, CAPTIONER, settings.captioner_tokenizer),
                                 (settings.filter, FILTER, settings.filter_tokenizer)):
        try:
            check_role(ref, role, tokenizer)
        except CheckpointError as error:
            problems.append(f"--{role} {ref}: {error}")
    return problems


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
