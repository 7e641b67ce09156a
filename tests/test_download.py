"""Download helpers, offline: files are served from tests/fixtures through file:// URLs or a
counting opener, in the same zip layout as the figshare downloads."""

from __future__ import annotations

import hashlib
import io
import json
import pathlib
import zipfile

import pytest

from dpf_jax.data import download, readers

FIX = pathlib.Path(__file__).resolve().parent / "fixtures"


def _zip(path: pathlib.Path, member: str, data: bytes) -> str:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(member, data)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def served(tmp_path):
    """A figshare-style JARVIS zip and a MEGNet-style MP zip in a 'server' folder."""
    server = tmp_path / "server"
    server.mkdir()
    jarvis_zip = server / "29204826"
    mp_zip = server / "15087992"
    return {
        "jarvis": (jarvis_zip, _zip(jarvis_zip, "jdft_3d-test.json", (FIX / "jarvis_dft3d_sample.json").read_bytes())),
        "mp": (mp_zip, _zip(mp_zip, "mp.test.json", (FIX / "mp_megnet_sample.json").read_bytes())),
    }


class CountingOpener:
    """Serves URLs from a {url: local path} map and counts the requests."""

    def __init__(self, files: dict[str, pathlib.Path]):
        self.files = files
        self.calls: list[str] = []

    def __call__(self, url: str, timeout: float):
        self.calls.append(url)
        if url not in self.files:
            raise OSError(f"404 for {url}")
        return io.BytesIO(self.files[url].read_bytes())


def test_download_caches_and_verifies(tmp_path, served):
    src, sha = served["jarvis"]
    opener = CountingOpener({"https://example.org/files/1": src})
    cache = tmp_path / "cache"
    p1 = download.download_file("https://example.org/files/1", "j.json.zip", sha256=sha, cache_dir=cache, opener=opener, progress=False)
    p2 = download.download_file("https://example.org/files/1", "j.json.zip", sha256=sha, cache_dir=cache, opener=opener, progress=False)
    assert p1 == p2 == cache / "j.json.zip"
    assert len(opener.calls) == 1  # second call served from the cache
    assert p1.read_bytes() == src.read_bytes()
    assert sorted(f.name for f in cache.iterdir()) == ["j.json.zip"]  # no .part left
    download.download_file("https://example.org/files/1", "j.json.zip", sha256=sha, cache_dir=cache, opener=opener, force=True, progress=False)
    assert len(opener.calls) == 2


def test_file_url_with_default_opener(tmp_path, served):
    src, sha = served["mp"]
    p = download.download_file(src.as_uri(), sha256=sha, cache_dir=tmp_path / "c", progress=False)
    assert p.name == "15087992" and p.read_bytes() == src.read_bytes()


def test_checksum_mismatch_raises_and_leaves_nothing(tmp_path, served):
    src, sha = served["jarvis"]
    cache = tmp_path / "cache"
    with pytest.raises(download.ChecksumError) as info:
        download.download_file(src.as_uri(), "j.zip", sha256="0" * 64, cache_dir=cache, progress=False)
    assert info.value.expected == "0" * 64 and info.value.actual == sha
    assert "0" * 64 in str(info.value) and sha in str(info.value) and src.as_uri() in str(info.value)
    assert list(cache.iterdir()) == []


def test_corrupt_cached_file_is_downloaded_again(tmp_path, served):
    src, sha = served["jarvis"]
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "j.zip").write_bytes(b"truncated")
    opener = CountingOpener({"u://x": src})
    p = download.download_file("u://x", "j.zip", sha256=sha, cache_dir=cache, opener=opener, progress=False)
    assert len(opener.calls) == 1 and download.sha256_file(p) == sha


def test_unknown_checksum_warns_with_actual_value(tmp_path, served):
    src, sha = served["jarvis"]
    with pytest.warns(UserWarning, match=f"not verified.*{sha}"):
        download.download_file(src.as_uri(), "j.zip", sha256=None, cache_dir=tmp_path, progress=False)


def test_failed_and_interrupted_downloads(tmp_path, served):
    cache = tmp_path / "cache"
    missing = (tmp_path / "nope.zip").as_uri()
    with pytest.raises(download.DownloadError, match="nope.zip"):
        download.download_file(missing, cache_dir=cache, progress=False)

    class Broken(io.BytesIO):
        def read(self, n=-1):
            if self.tell() > 10:
                raise ConnectionResetError("connection reset")
            return super().read(5)

    with pytest.raises(download.DownloadError, match="interrupted"):
        download.download_file("u://b", "b.zip", cache_dir=cache, opener=lambda u, t: Broken(b"x" * 100), progress=False)
    assert list(cache.iterdir()) == []


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DPF_JAX_CACHE", str(tmp_path / "env_cache"))
    assert download.default_cache_dir() == tmp_path / "env_cache"
    assert (tmp_path / "env_cache").is_dir()
    assert download.default_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("DPF_JAX_CACHE")
    assert download.default_cache_dir() == pathlib.Path.home() / ".cache" / "dpf_jax"


def test_fetch_extracts_and_readers_parse(tmp_path, served, monkeypatch):
    src, sha = served["jarvis"]
    monkeypatch.setitem(
        download.DATASETS,
        "test_jarvis",
        download.RemoteFile(url=src.as_uri(), filename="jdft_3d-test.json.zip", member="jdft_3d-test.json", sha256=sha),
    )
    path = download.fetch("test_jarvis", cache_dir=tmp_path / "cache", progress=False)
    assert path == tmp_path / "cache" / "jdft_3d-test.json"
    assert len(readers.read_jarvis_json(path)) == 5
    d = download.load_public_dataset(
        "test_jarvis",
        "formation_energy_peratom",
        "test",
        split_file=FIX / "dft_3d_formation_energy_peratom.json.zip",
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    assert [c.id for c in d] == ["JVASP-19"]
    # without extraction the readers take the zip directly
    zipped = download.fetch("test_jarvis", cache_dir=tmp_path / "cache", extract=False, progress=False)
    assert zipped.suffix == ".zip" and len(readers.load_dataset_records(zipped)) == 5


def test_load_public_mp_dataset_with_leaderboard_split(tmp_path, served, monkeypatch):
    src, sha = served["mp"]
    monkeypatch.setitem(
        download.DATASETS,
        "test_mp",
        download.RemoteFile(url="https://figshare.test/15087992", filename="mp.test.json.zip", member="mp.test.json", sha256=sha, reader="mp"),
    )
    split = tmp_path / "split.json.zip"
    ids = json.loads((FIX / "mp_megnet_sample.json").read_text())
    _zip(split, "megnet_e_form.json", json.dumps({"train": {e["material_id"]: e["formation_energy_per_atom"] for e in ids[:4]}, "test": {ids[4]["material_id"]: ids[4]["formation_energy_per_atom"]}}).encode())
    opener = CountingOpener(
        {"https://figshare.test/15087992": src, download.LEADERBOARD_SPLIT_URL.format(benchmark="megnet_e_form"): split}
    )
    with pytest.warns(UserWarning, match="megnet_e_form.json.zip: no sha256 known"):
        d = download.load_public_dataset(
            "test_mp",
            "formation_energy_per_atom",
            "test",
            leaderboard_benchmark="megnet_e_form",
            cache_dir=tmp_path / "cache",
            opener=opener,
            progress=False,
        )
    assert [c.id for c in d] == ["mp-17"]
    assert (tmp_path / "cache" / "jarvis_leaderboard_megnet_e_form.json.zip").is_file()
    with pytest.raises(ValueError, match="unknown dataset"):
        download.load_public_dataset("nope", cache_dir=tmp_path)


def test_extract_zip_member_safety(tmp_path):
    z = tmp_path / "a.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("../evil.json", "[]")
        zf.writestr("dir/b.json", "[1]")
    out = download.extract_zip_member(z, "../evil.json", tmp_path / "out")
    assert out == tmp_path / "out" / "evil.json" and out.read_text() == "[]"
    assert download.extract_zip_member(z, "b.json", tmp_path / "out").read_text() == "[1]"
    with pytest.raises(ValueError, match="no member 'c.json'"):
        download.extract_zip_member(z, "c.json")
    with pytest.raises(ValueError, match="pass member="):
        download.extract_zip_member(z)
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="bad.zip"):
        download.extract_zip_member(bad)


def test_dataset_table_is_consistent():
    names = [s.filename for s in download.DATASETS.values()]
    assert len(names) == len(set(names))
    for name, spec in download.DATASETS.items():
        assert spec.url.startswith("https://"), name
        assert spec.reader in ("jarvis", "mp", "gnome_summary", "gnome_structures"), name
        assert spec.sha256 is None or len(spec.sha256) == 64, name
        if spec.reader in ("jarvis", "mp"):
            assert spec.member and spec.member.endswith(".json") and spec.filename == spec.member + ".zip", name
