"""``capfilt bootstrap`` end to end: a URL list served on 127.0.0.1, img2dataset, the pipeline, the report.

The only network is a loopback HTTP server in a thread (PIL-made JPEGs, a
404 and a page that is not an image); nothing leaves the machine.
"""

from __future__ import annotations

import io
import json
import os
import tarfile

import duckdb
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from capfilt import cli
from capfilt.help_format import HelpWithDefaults
from capfilt.ingest import datasets, named
from capfilt.ingest.url_list import DatasetNotAvailableError
from capfilt.pipelines.settings import BootstrapSettings
from capfilt.recipes import bootstrap as recipe
from capfilt.recipes.bootstrap import UsageError, parse_shard_selection
from loopback import Handler, LoopbackHTTP, keep_proxies_away

IMAGES = 6


def jpeg(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48 + 4 * i, 40), (40 * i, 120, 200 - 30 * i)).save(buffer, format="JPEG")
    return buffer.getvalue()


class LoopbackServer(LoopbackHTTP):
    """An HTTP server on 127.0.0.1 answering from a dict of path -> (content type, body); 404 otherwise."""

    def __init__(self, routes: dict[str, tuple[str, bytes]]):
        routes_ = routes

        class Routes(Handler):
            def do_GET(self):  # noqa: N802 - the stdlib's name
                if self.path not in routes_:
                    self.send_error(404, "Not Found")
                    return
                self.answer(200, *routes_[self.path])

        super().__init__(Routes)


@pytest.fixture
def loopback(monkeypatch):
    keep_proxies_away(monkeypatch)
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        data = b'{"image_urls": ["http://127.0.0.1/1.jpg"], "captions": ["one"]}'
        info = tarfile.TarInfo("sbu/sbu-captions-all.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    routes = {f"/img/{i}.jpg": ("image/jpeg", jpeg(i)) for i in range(IMAGES)}
    routes["/page.html"] = ("text/html", b"<html><body>not an image</body></html>")
    routes["/sbu.tar.gz"] = ("application/gzip", archive.getvalue())
    with LoopbackServer(routes) as server:
        yield server


@pytest.fixture
def one_torch_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the DoFn restores it too; this guards a failed run


def test_shard_selection():
    assert parse_shard_selection(None, 4) == [0, 1, 2, 3]
    assert parse_shard_selection("0-1,3", 4) == [0, 1, 3]
    with pytest.raises(UsageError, match="there are 4 input shards"):
        parse_shard_selection("2-5", 4)
    with pytest.raises(UsageError, match="indices and ranges"):
        parse_shard_selection("first", 4)


def test_default_models_follow_the_data():
    assert recipe.default_models("demo") == ("demo", "demo")
    assert recipe.default_models("cc12m") == ("Salesforce/blip-image-captioning-large",
                                               "Salesforce/blip-itm-large-coco")


def test_a_model_not_on_disk_is_a_clear_error(tmp_path, capsys):
    code = cli.main(["bootstrap", "--data", "cc12m", "--out", str(tmp_path / "out"),
                     "--captioner", "Salesforce/no-such-captioner-xyz", "--cache-dir", str(tmp_path)])
    assert code == 2
    error = capsys.readouterr().err
    assert "Salesforce/no-such-captioner-xyz" in error and "local hub cache" in error


def test_datasets_listing(tmp_path, capsys):
    assert cli.main(["datasets", "--cache-dir", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in ("demo", "cc12m", "cc3m", "sbu", "laion400m"))


def test_named_dataset_fetch_over_loopback(loopback, tmp_path, monkeypatch):
    spec = named.NAMED["sbu"]
    monkeypatch.setitem(named.NAMED, "sbu", named.NamedDataset(
        **{**spec.__dict__, "files": ((loopback.url + "/sbu.tar.gz", "sbu-captions-all.tar.gz"),)}))
    source = datasets.resolve("sbu", cache=tmp_path, fetch=True)
    assert source.url_list.paths == (tmp_path / "sbu" / "sbu-captions-all.json",)
    spec = named.NAMED["cc12m"]
    monkeypatch.setitem(named.NAMED, "cc12m", named.NamedDataset(
        **{**spec.__dict__, "files": ((loopback.url + "/gone.tsv", "cc12m.tsv"),)}))
    with pytest.raises(DatasetNotAvailableError, match="404") as error:
        datasets.resolve("cc12m", cache=tmp_path, fetch=True)
    assert str(tmp_path / "cc12m" / "cc12m.tsv") in str(error.value)
    assert not (tmp_path / "cc12m" / "cc12m.tsv").exists()


def test_bootstrap_a_url_list_end_to_end(loopback, captioner_folder, filter_folder, tmp_path, one_torch_thread,
                                        capsys):
    urls = [(f"{loopback.url}/img/{i}.jpg", f"picture number {i}") for i in range(IMAGES)]
    urls += [(f"{loopback.url}/missing.jpg", "a lost picture"), (f"{loopback.url}/page.html", "a web page"),
             ("", "a row without URL")]
    metadata = "http://169.254.169.254/latest/meta-data/"  # link-local: refused even with --allow-private-addresses
    lines = [f"{url}\t{caption}" for url, caption in urls + [(metadata, "instance metadata")]]  # CC12M's layout
    malformed = f"{loopback.url}/img/0.jpg\ta caption\twith a stray tab"
    lines.insert(3, malformed)  # line 4: three fields where the list has two
    url_list = tmp_path / "urls.tsv"
    url_list.write_text("".join(line + "\n" for line in lines))
    out = tmp_path / "out"
    code = cli.main([
        "bootstrap", "--data", str(url_list), "--out", str(out),
        "--captioner", str(captioner_folder), "--filter", str(filter_folder),
        "--processes", "1", "--threads", "4", "--samples-per-shard", "4", "--timeout", "5",
        "--batch-size", "4", "--torch-threads", "1", "--progress-interval", "1", "--allow-private-addresses",
    ])
    assert code == 0
    # img2dataset kept a row for every URL; the pipeline accounted for each.
    stats = duckdb.sql(f"select count(*) from read_parquet('{out}/.capfilt/shards/*.parquet')").fetchall()[0][0]
    assert stats == len(lines)
    judged = duckdb.sql(f"""
        select url, source, count(*) as n from (
            select url, source from read_parquet('{out}/kept/*.parquet')
            union all select url, source from read_parquet('{out}/rejected/*.parquet'))
        group by url, source order by url, source""").fetchall()
    assert judged == sorted((url, source, 1) for url, _ in urls[:IMAGES] for source in ("synthetic", "web"))
    failed = {r["web_text"]: r for r in pq.read_table(out / "failed").to_pylist()}
    assert set(failed) == {"a lost picture", "a web page", "a row without URL", "instance metadata", malformed}
    assert {r["stage"] for k, r in failed.items() if k != malformed} == {"download"}
    # The line that did not parse: its own stage, its line number and reason, its text; not downloaded.
    assert failed[malformed]["stage"] == "parse" and failed[malformed]["url"] is None
    assert failed[malformed]["error"] == "malformed line 4 of urls.tsv: expected 2 fields, got 3"
    assert json.loads((out / "stats.json").read_text())["failed"]["parse"] == 1
    # The refused URL: never fetched, failed at download with its URL and the reason.
    refused = failed["instance metadata"]
    assert refused["url"] == metadata and refused["error"] and refused["status"] == "failed_to_download"
    assert "404" in failed["a lost picture"]["error"] and failed["a lost picture"]["status"] == "failed_to_download"
    assert failed["a web page"]["status"] == "failed_to_resize" and failed["a web page"]["error"]
    assert failed["a row without URL"]["status"] == "failed_to_download"
    assert all(r["key"] for r in failed.values()) and len({r["key"] for r in failed.values()}) == len(failed)
    assert (out / "report.html").is_file()

    # A rerun finds everything done and changes nothing.
    kept_before = pq.read_table(out / "kept").to_pylist()
    assert cli.main(["bootstrap", "--data", str(url_list), "--out", str(out), "--captioner", str(captioner_folder),
                     "--filter", str(filter_folder), "--processes", "1", "--threads", "4",
                     "--samples-per-shard", "4", "--batch-size", "4", "--torch-threads", "1",
                     "--allow-private-addresses"]) == 0
    assert pq.read_table(out / "kept").to_pylist() == kept_before
    assert {r["key"]: r for r in pq.read_table(out / "failed").to_pylist()}[failed[malformed]["key"]] == \
        failed[malformed]  # the same key

    # Rows appended to the list: reported before anything runs, not "every shard already done".
    with url_list.open("a") as f:
        f.write(f"{loopback.url}/img/1.jpg\tone more\n")
    assert cli.main(["bootstrap", "--data", str(url_list), "--out", str(out), "--captioner", str(captioner_folder),
                     "--filter", str(filter_folder), "--samples-per-shard", "4", "--allow-private-addresses"]) == 2
    assert "grew since the shards" in capsys.readouterr().err
    assert pq.read_table(out / "kept").to_pylist() == kept_before


def test_bootstrap_the_demo_world(captioner_folder, filter_folder, tmp_path, one_torch_thread):
    out = tmp_path / "demo"
    code = cli.main(["bootstrap", "--out", str(out), "--captioner", str(captioner_folder),
                     "--filter", str(filter_folder), "--demo-size", "8", "--demo-shard-size", "4",
                     "--shards", "1", "--torch-threads", "1", "-k", "2", "--threshold", "0"])
    assert code == 0
    kept = pq.read_table(out / "kept").to_pylist()
    rejected = pq.read_table(out / "rejected").to_pylist()
    assert {r["reason"] for r in rejected} <= {"duplicate text"}  # threshold 0 passes every pair
    assert {r["key"][:5] for r in kept} == {"00001"}  # only the selected shard
    assert len(kept) + len(rejected) == 4 * 3  # four images, the web text and K=2 captions each
    assert {r["kind"] for r in kept} <= {"clean", "mismatch", "partial", "alt"} and all(r["scene"] for r in kept)
    read_back_by_downstream_trainers(out / "kept", captioner_folder)


def test_shards_folder_is_bound_to_its_input(tmp_path):
    folder = tmp_path / "shards"
    assert recipe.record_source(folder, {"data": "demo", "size": 8}) is False
    assert recipe.record_source(folder, {"data": "demo", "size": 8}) is True
    with pytest.raises(UsageError, match="another input"):
        recipe.record_source(folder, {"data": "demo", "size": 12})


def test_a_remote_out_needs_a_local_shards_folder():
    args = cli.build_parser().parse_args(["bootstrap", "--out", "gs://bucket/run"])
    with pytest.raises(UsageError, match="--shards-dir"):
        recipe.shards_folder(cli.run_from_args(args, []))


def read_back_by_downstream_trainers(kept, tokenizer_folder):
    """kept/ as HF datasets and capfilt's own MED trainer read it: the same rows, images that decode."""
    from datasets import Image, load_dataset

    from capfilt.models.augment import AugmentConfig
    from capfilt.models.data import DataConfig, EpochLoader, detect_layout, find_files
    from capfilt.tokenizer import load_tokenizer

    expected = pq.read_table(kept).to_pylist()
    files = [str(path) for path in sorted(kept.glob("*.parquet"))]
    hf = load_dataset("parquet", data_files=files, split="train")
    assert len(hf) == len(expected) and sorted(hf["caption"]) == sorted(row["caption"] for row in expected)
    assert isinstance(hf.features["jpg"], Image)  # typed as an image: rows decode to PIL images
    assert [row["jpg"].size for row in hf] == [(row["width"], row["height"]) for row in hf]
    layout = detect_layout(pq.read_schema(files[0]).names)
    assert all(row[layout.text] == row["caption"] for row in expected)  # trains on the kept text, not the web one
    config = DataConfig(batch_size=len(expected), workers=1, max_tokens=16, shuffle=False)
    (batch,) = list(EpochLoader(find_files(files), config, load_tokenizer(tokenizer_folder), 32,
                                AugmentConfig(augment=False), seed=0, epoch=0, streams=1, rank=0, world_size=1))
    assert batch.pixel_values.shape == (len(expected), 3, 32, 32)


def test_the_portable_runner_writes_what_the_local_runner_writes(captioner_folder, filter_folder, tmp_path,
                                                                  one_torch_thread):
    """Flink, Spark and Dataflow (runner v2) get the pipeline as portable protos through a job server. Beam's
    embedded job server (LOOPBACK workers in this process) takes the same path, so every transform, coder and
    DoFn must survive it; the rows must come out as the in-process runner writes them."""
    common = ["--captioner", str(captioner_folder), "--filter", str(filter_folder), "--demo-size", "12",
              "--demo-shard-size", "6", "--torch-threads", "1", "-k", "2"]
    local, portable = tmp_path / "local", tmp_path / "portable"
    assert cli.main(["bootstrap", "--out", str(local), "--shards-dir", str(tmp_path / "shards"), *common]) == 0
    assert cli.main(["bootstrap", "--out", str(portable), "--shards-dir", str(tmp_path / "shards"), *common,
                     "--runner", "PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"]) == 0

    def rows(out, folder):
        table = pq.read_table(out / folder)
        return sorted(json.dumps(row, sort_keys=True, default=str) for row in table.to_pylist())

    for folder in ("kept", "rejected"):
        assert rows(portable, folder) == rows(local, folder)
    assert len(rows(local, "kept")) + len(rows(local, "rejected")) == 12 * 3  # web text + K=2 captions each
    local_stats, portable_stats = (json.loads((out / "stats.json").read_text()) for out in (local, portable))
    assert portable_stats["rows"] == local_stats["rows"] == 12
    assert portable_stats["noise_ratio"] == local_stats["noise_ratio"]


def test_worker_processes_share_the_cores_unless_told():
    from argparse import Namespace

    cores = os.cpu_count() or 1
    assert cli.torch_threads(Namespace(torch_threads=None, workers=1)) is None  # torch's default
    assert cli.torch_threads(Namespace(torch_threads=None, workers=2)) == max(1, cores // 2)
    assert cli.torch_threads(Namespace(torch_threads=None, workers=4 * cores)) == 1
    assert cli.torch_threads(Namespace(torch_threads=3, workers=2)) == 3


def test_the_flags_defaults_are_the_settings_own():
    from capfilt.captioner import SamplingSettings
    from capfilt.ingest.download import DownloadSettings

    args, _ = cli.build_parser().parse_known_args(["bootstrap"])
    assert vars(cli.bootstrap_parser().parse_args([])) == {k: v for k, v in vars(args).items()
                                                            if k not in ("command", "verbose")}
    settings, download, demo = BootstrapSettings(), DownloadSettings(), datasets.DemoInput()
    for flag, owner in (("device", settings), ("precision", settings), ("decode_threads", settings),
                        ("num_captions", settings), ("batch_size", settings),
                        ("seed", settings), ("min_image_size", settings),
                        ("processes", download), ("threads", download), ("image_size", download),
                        ("samples_per_shard", download), ("distributor", download), ("output_format", download),
                        ("timeout", download), ("retries", download)):
        assert getattr(args, flag) == getattr(owner, flag), flag
    assert (args.demo_size, args.demo_seed, args.demo_shard_size) == (demo.size, demo.seed, demo.shard_size)
    # The flags left out keep the run's settings: the same as BootstrapSettings' own for the demo.
    assert cli.settings_from_args(args) == settings
    # The sampling flags default to None (the captioner folder's own, else the paper's): their help names the paper's.
    help_of = {action.dest: action.help for action in cli.bootstrap_parser()._actions}
    paper = SamplingSettings()
    for name in ("method", "top_p", "top_k"):
        assert args.__dict__[name] is None and help_of[name].endswith(f"the paper's {getattr(paper, name)})")
    for name in ("max_length", "min_length"):  # BLIP's, then BLIP-2's and InstructBLIP's (new tokens)
        assert args.__dict__[name] is None and f"the paper's {getattr(paper, name)} for BLIP" in help_of[name]
    # The threshold defaults by the filter's score: the paper's 0.5 for an ITM filter (the demo's)
    assert args.threshold is None and args.by is None and f"{settings.threshold} by itm" in help_of["threshold"]


def test_every_bootstrap_flag_shows_its_default(capsys):
    parser = cli.bootstrap_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, also at hyphens
    for action in parser._actions:
        if action.option_strings and action.nargs != 0:  # switches are off unless given
            formatted = HelpWithDefaults("capfilt")._get_help_string(action)
            assert "default" in formatted, action.option_strings
            assert "".join(formatted.split()).replace("%(default)s", str(action.default)) in text
    assert "Exitstatus:0" in text and "4(with--strictonly)" in text


def test_loopback_urls_are_refused_unless_allowed(loopback, captioner_folder, filter_folder, tmp_path,
                                                  one_torch_thread):
    url_list = tmp_path / "urls.tsv"
    url_list.write_text(f"{loopback.url}/img/0.jpg\tzero\n{loopback.url}/img/1.jpg\tone\n")
    out = tmp_path / "out"
    common = ["bootstrap", "--data", str(url_list), "--out", str(out), "--captioner", str(captioner_folder),
              "--filter", str(filter_folder), "--processes", "1", "--threads", "2", "--torch-threads", "1"]
    assert cli.main(common) == 0
    failed = pq.read_table(out / "failed").to_pylist()
    assert [(r["url"], r["stage"]) for r in sorted(failed, key=lambda r: r["web_text"])] == [
        (f"{loopback.url}/img/1.jpg", "download"), (f"{loopback.url}/img/0.jpg", "download")]
    assert all(r["error"] for r in failed) and pq.read_table(out / "kept").num_rows == 0
    # The shards were downloaded under the default policy: another policy in the same folder is refused, not mixed.
    assert cli.main([*common, "--allow-private-addresses"]) == 2
