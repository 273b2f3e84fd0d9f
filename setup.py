"""capfilt: an open, scalable implementation of BLIP's CapFilt.

Packaging: the repository keeps three top-level folders, ``capfilt/`` (the
captioner, the filter, checkpoints, data), ``models/`` (the MED and its
training) and ``pipelines/`` (the Beam pipelines). They install under one
import root, ``capfilt``: ``models/`` becomes ``capfilt.models`` and
``pipelines/`` becomes ``capfilt.pipelines``, so nothing generic such as a
top-level ``models`` package lands in site-packages. The same file is what
Beam's ``--setup_file`` builds and ships to remote workers.
"""

from setuptools import find_packages, setup

PACKAGE_DIR = {
    "capfilt": "capfilt",
    "capfilt.models": "models",
    "capfilt.pipelines": "pipelines",
}

# Each root with its sub-packages (capfilt.shapes, ...), which setuptools maps below the root's folder.
PACKAGES = [*PACKAGE_DIR, *(f"{root}.{sub}" for root, folder in PACKAGE_DIR.items() for sub in find_packages(folder))]

# torch is not pinned here: `make install` installs the CPU build first
# (torch==2.13.0), and a GPU cluster brings its own CUDA build.
INSTALL_REQUIRES = [
    "torch>=2.4",
    "transformers>=5.0,<6",
    "safetensors>=0.4",
    "apache-beam>=2.60",
    "pyarrow>=14",
    "pillow>=10",
    "numpy>=1.26",
    "tqdm>=4.60",
]

EXTRAS_REQUIRE = {
    # Downloading URL lists; img2dataset brings its own distributors.
    "download": ["img2dataset>=1.45"],
    # Tests read the output back as downstream trainers do: pyarrow, DuckDB, HF datasets, and webdataset (the
    # tars of `capfilt export-dataset`, as open_clip reads them; pure Python, img2dataset depends on it too).
    "dev": ["pytest>=8", "duckdb>=1.0", "datasets>=3", "img2dataset>=1.45", "webdataset>=0.2"],
    # `--runner DaskRunner`: Beam's DaskRunner on a dask.distributed cluster (docs/pipeline.md, "Dask"). The
    # floor is that of Beam 2.77's `apache-beam[dask]` extra, which has no ceiling; 2024.4.2 and 2026.8.0 both
    # pass tests/test_dask.py. The ceiling: Beam's runner builds on dask.bag and Dask releases monthly, so a new
    # year of Dask is tried before it is taken.
    "dask": ["dask[distributed]>=2024.4.2,<2027", "distributed>=2024.4.2,<2027"],
}

setup(
    name="capfilt",
    version="0.1.0",
    description="CapFilt (BLIP, Li et al. 2022): caption and filter web image-text data at scale",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    package_dir=PACKAGE_DIR,
    packages=PACKAGES,
    package_data={"capfilt": ["demo_models/*/*", "demo_models/*/*/*"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["capfilt=capfilt.cli:main"]},
)
