"""Download helpers for the full public datasets (these need internet; nothing else in dpf_jax does).

Files are cached under `~/.cache/dpf_jax` (override with the `DPF_JAX_CACHE` environment
variable or a `cache_dir=` argument), written atomically (downloaded to a `*.part` file in the
cache folder, then renamed), checked against the sha256 of the `DATASETS` table, and zip archives
are extracted next to them. A file already in the cache is not downloaded again.

Sources (URLs and file names as used by the reference tools):

| name | what | URL (from) |
| --- | --- | --- |
| `jarvis_dft_3d_2021` | JARVIS-DFT 3D 2021.8.18, 55,713 entries: the release of the jarvis-leaderboard dft_3d benchmarks and Matformer | figshare file 29204826 (jarvis-tools `jarvis.db.figshare`, key "dft_3d_2021") |
| `jarvis_dft_3d` | JARVIS-DFT 3D 2025.9.24 (~94k entries): current jarvis-tools "dft_3d" | figshare file 64391379 (jarvis-tools 2026.6.12) |
| `jarvis_megnet` | MEGNet MP 2018.6.1 in JARVIS format (fields "e_form", "gap pbe", "bulk modulus", "shear modulus"), as Matformer trains on it | figshare file 26724977 (jarvis-tools key "megnet") |
| `megnet_mp_2018` | MEGNet's own `mp.2018.6.1.json` (69,239 entries; CIF strings) | figshare file 15087992 (MEGNet / matgl examples) |
| `gnome_summary`, `gnome_by_id` | GNoME stable materials: summary CSV and `by_id.zip` of CIFs | `storage.googleapis.com/gdm_materials_discovery/gnome_data/` |

jarvis-leaderboard split files (`{"train": {id: value}, "val": ..., "test": ...}`) are fetched
by benchmark name with `fetch_leaderboard_split("dft_3d_formation_energy_peratom")`; they are also
inside the PyPI wheel `jarvis-leaderboard` (`jarvis_leaderboard/benchmarks/AI/SinglePropertyPrediction/`).

Checksums: figshare publishes md5 only and these files could not be downloaded when this module
was written, so the table has `sha256=None` for them: such downloads are not verified and warn
with the sha256 they got (`sha256_file(path)` computes it too); put that value in the table, or
pass `sha256=` to the functions, to verify from then on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pathlib
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
from typing import Any, Callable

from dpf_jax.data import readers

logger = logging.getLogger(__name__)

ENV_CACHE = "DPF_JAX_CACHE"
USER_AGENT = "dpf_jax/0.1 (python urllib)"

FIGSHARE = "https://ndownloader.figshare.com/files"
GNOME_BASE_URL = "https://storage.googleapis.com/gdm_materials_discovery/gnome_data"
LEADERBOARD_SPLIT_URL = (
    "https://raw.githubusercontent.com/usnistgov/jarvis_leaderboard/main/"
    "jarvis_leaderboard/benchmarks/AI/SinglePropertyPrediction/{benchmark}.json.zip"
)


class DownloadError(OSError):
    """A download that failed (network, HTTP status, missing local file), naming the URL."""


class ChecksumError(ValueError):
    """A file whose sha256 is not the expected one."""

    def __init__(self, path: str, expected: str, actual: str):
        self.path, self.expected, self.actual = str(path), expected, actual
        super().__init__(f"{path}: sha256 mismatch: expected {expected}, got {actual}")


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """One downloadable file.

    Attributes:
      url: where to get it.
      filename: its name in the cache folder.
      sha256: expected sha256 (hex) of the downloaded file, None if not known yet.
      member: the file to extract from the zip archive (None: use the download as is).
      reader: "jarvis", "mp", "gnome_summary" or "gnome_structures": how to read it.
      description: what it is (size, version, who uses it).
    """

    url: str
    filename: str
    sha256: str | None
    member: str | None = None
    reader: str = "jarvis"
    description: str = ""


DATASETS: dict[str, RemoteFile] = {
    "jarvis_dft_3d_2021": RemoteFile(
        url=f"{FIGSHARE}/29204826",
        filename="jdft_3d-8-18-2021.json.zip",
        member="jdft_3d-8-18-2021.json",
        sha256=None,
        reader="jarvis",
        description="JARVIS-DFT 3D, 2021.8.18 release (55,713 entries); the version behind the "
        "jarvis-leaderboard dft_3d benchmarks and Matformer's JARVIS results",
    ),
    "jarvis_dft_3d": RemoteFile(
        url=f"{FIGSHARE}/64391379",
        filename="jdft_3d-9-24-2025.json.zip",
        member="jdft_3d-9-24-2025.json",
        sha256=None,
        reader="jarvis",
        description="JARVIS-DFT 3D, 2025.9.24 release (~94k entries); jarvis-tools' current 'dft_3d'",
    ),
    "jarvis_megnet": RemoteFile(
        url=f"{FIGSHARE}/26724977",
        filename="megnet.json.zip",
        member="megnet.json",
        sha256=None,
        reader="jarvis",
        description="MEGNet Materials Project 2018.6.1 set in JARVIS format (~69k entries; "
        "'e_form', 'gap pbe', 'bulk modulus', 'shear modulus'); what Matformer trains on for MP",
    ),
    "megnet_mp_2018": RemoteFile(
        url=f"{FIGSHARE}/15087992",
        filename="mp.2018.6.1.json.zip",
        member="mp.2018.6.1.json",
        sha256=None,
        reader="mp",
        description="MEGNet's mp.2018.6.1.json (69,239 entries; 'material_id', CIF 'structure', "
        "'formation_energy_per_atom', 'band_gap', 'K_VRH', 'G_VRH')",
    ),
    "gnome_summary": RemoteFile(
        url=f"{GNOME_BASE_URL}/stable_materials_summary.csv",
        filename="gnome_stable_materials_summary.csv",
        sha256=None,
        reader="gnome_summary",
        description="GNoME stable materials summary CSV (CC BY-NC 4.0)",
    ),
    "gnome_by_id": RemoteFile(
        url=f"{GNOME_BASE_URL}/by_id.zip",
        filename="gnome_by_id.zip",
        sha256=None,
        reader="gnome_structures",
        description="GNoME stable materials, one CIF per MaterialId (CC BY-NC 4.0; several GB)",
    ),
}


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """`cache_dir` if given, else `$DPF_JAX_CACHE`, else `~/.cache/dpf_jax`; created if missing."""
    if cache_dir is None:
        cache_dir = os.environ.get(ENV_CACHE) or pathlib.Path.home() / ".cache" / "dpf_jax"
    path = pathlib.Path(cache_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def _default_opener(url: str, timeout: float):
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - URLs come from the table or the caller


def _content_length(response: Any) -> int | None:
    headers = getattr(response, "headers", None)
    try:
        value = headers.get("Content-Length") if headers is not None else None
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def download_file(
    url: str,
    filename: str | None = None,
    *,
    sha256: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
    opener: Callable[[str, float], Any] | None = None,
    timeout: float = 60.0,
    chunk_size: int = 1 << 20,
) -> pathlib.Path:
    """Downloads `url` into the cache (once) and returns the local path.

    Args:
      filename: name in the cache folder (default: the last part of the URL path).
      sha256: expected hex sha256. If the cached file matches (or `sha256` is None and the file
        exists) nothing is downloaded. A mismatch after download deletes the file and raises
        `ChecksumError` with the expected and actual values. None skips verification with a warning.
      force: download again even if cached.
      opener: `opener(url, timeout)` -> response with `.read(n)` (and optional `.headers`), used
        as a context manager; default `urllib.request.urlopen` (handles http(s):// and file://).

    The data go to a temporary `<filename>.*.part` file in the cache folder, renamed to
    `<filename>` only once complete and verified, so an interrupted download never leaves a
    truncated file under the final name.
    """
    cache = default_cache_dir(cache_dir)
    if filename is None:
        filename = pathlib.PurePosixPath(urllib.parse.urlparse(url).path).name
        if not filename:
            raise ValueError(f"{url}: cannot derive a file name from the URL; pass filename=")
    if os.sep in filename or (os.altsep and os.altsep in filename) or filename in (".", ".."):
        raise ValueError(f"filename must be a plain file name, got {filename!r}")
    dest = cache / filename
    expected = sha256.lower() if sha256 else None
    if dest.is_file() and not force:
        if expected is None:
            return dest
        actual = sha256_file(dest)
        if actual == expected:
            return dest
        logger.warning("%s: cached file has sha256 %s, expected %s; downloading it again", dest, actual, expected)

    opener = opener or _default_opener
    fd, tmp_name = tempfile.mkstemp(dir=cache, prefix=f"{filename}.", suffix=".part")
    tmp = pathlib.Path(tmp_name)
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                response = opener(url, timeout)
            except (urllib.error.URLError, OSError, ValueError) as e:
                raise DownloadError(f"{url}: download failed: {type(e).__name__}: {e}") from e
            with response:
                from tqdm.auto import tqdm

                with tqdm(
                    total=_content_length(response),
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=filename,
                    disable=not progress,
                ) as bar:
                    while True:
                        try:
                            chunk = response.read(chunk_size)
                        except OSError as e:
                            raise DownloadError(f"{url}: download interrupted: {type(e).__name__}: {e}") from e
                        if not chunk:
                            break
                        out.write(chunk)
                        h.update(chunk)
                        bar.update(len(chunk))
        actual = h.hexdigest()
        if expected is None:
            warnings.warn(
                f"{url}: no sha256 known, download not verified; it has sha256 {actual} "
                f"(record it in dpf_jax.data.download.DATASETS or pass sha256=)",
                stacklevel=2,
            )
        elif actual != expected:
            raise ChecksumError(url, expected, actual)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.info("downloaded %s to %s (sha256 %s)", url, dest, actual)
    return dest


def extract_zip_member(
    zip_path: str | os.PathLike,
    member: str | None = None,
    dest_dir: str | os.PathLike | None = None,
    *,
    force: bool = False,
) -> pathlib.Path:
    """Extracts one file of a zip archive (default: its only file) next to it (or into `dest_dir`).

    The output keeps only the member's base name (no paths from the archive are created), is
    written atomically, and is reused if already extracted with the right size (unless `force`).
    Raises `ValueError` naming the archive if it is corrupt or has no such member.
    """
    zip_path = pathlib.Path(zip_path)
    dest = pathlib.Path(dest_dir) if dest_dir is not None else zip_path.parent
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(zip_path) as zf:
            files = [i for i in zf.infolist() if not i.is_dir() and not i.filename.startswith("__MACOSX")]
            if member is None:
                if len(files) != 1:
                    raise ValueError(
                        f"{zip_path}: archive holds {len(files)} files ({[i.filename for i in files][:5]}); pass member="
                    )
                info = files[0]
            else:
                matches = [i for i in files if i.filename == member or i.filename.rsplit("/", 1)[-1] == member]
                if not matches:
                    raise ValueError(f"{zip_path}: no member {member!r} (archive holds {[i.filename for i in files][:5]})")
                info = matches[0]
            out = dest / info.filename.rsplit("/", 1)[-1]
            if out.is_file() and not force and out.stat().st_size == info.file_size:
                return out
            fd, tmp_name = tempfile.mkstemp(dir=dest, prefix=f"{out.name}.", suffix=".part")
            tmp = pathlib.Path(tmp_name)
            try:
                with os.fdopen(fd, "wb") as dst, zf.open(info) as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
                os.replace(tmp, out)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            return out
    except zipfile.BadZipFile as e:
        raise ValueError(f"{zip_path}: corrupt zip archive: {e}") from None


_FROM_TABLE: Any = object()


def fetch(
    name: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    sha256: str | None = _FROM_TABLE,
    extract: bool = True,
    force: bool = False,
    progress: bool = True,
    opener: Callable[[str, float], Any] | None = None,
) -> pathlib.Path:
    """Downloads (once) the dataset `name` of `DATASETS` and returns its local path.

    With `extract=True` and a zip download, returns the extracted `member` (the JSON file);
    otherwise the downloaded file. `sha256` overrides the table's value (None: don't verify).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    spec = DATASETS[name]
    path = download_file(
        spec.url,
        spec.filename,
        sha256=spec.sha256 if sha256 is _FROM_TABLE else sha256,
        cache_dir=cache_dir,
        force=force,
        progress=progress,
        opener=opener,
    )
    if extract and spec.member is not None:
        return extract_zip_member(path, spec.member, force=force)
    return path


def fetch_leaderboard_split(
    benchmark: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    sha256: str | None = None,
    force: bool = False,
    progress: bool = True,
    opener: Callable[[str, float], Any] | None = None,
) -> pathlib.Path:
    """Downloads the jarvis-leaderboard split file of a SinglePropertyPrediction benchmark,
    e.g. "dft_3d_formation_energy_peratom" or "megnet_e_form"; returns the `.json.zip` path
    (pass it as `split_file=` to the readers)."""
    if not benchmark or "/" in benchmark:
        raise ValueError(f"benchmark must be a name like 'dft_3d_formation_energy_peratom', got {benchmark!r}")
    return download_file(
        LEADERBOARD_SPLIT_URL.format(benchmark=benchmark),
        f"jarvis_leaderboard_{benchmark}.json.zip",
        sha256=sha256,
        cache_dir=cache_dir,
        force=force,
        progress=progress,
        opener=opener,
    )


def load_public_dataset(
    name: str,
    task: str | None = None,
    split: str | None = None,
    transform: str | Callable | None = None,
    *,
    split_file: str | os.PathLike | None = None,
    leaderboard_benchmark: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    extract: bool = True,
    progress: bool = True,
    opener: Callable[[str, float], Any] | None = None,
    **reader_kwargs: Any,
) -> readers.DatasetRecords:
    """Downloads (once) and reads a public dataset into a `DatasetRecords`.

    `name` is a key of `DATASETS`; "gnome" reads `gnome_summary` + `gnome_by_id` (pass
    `limit=`/`targets=` through `reader_kwargs`). `leaderboard_benchmark` (e.g.
    "dft_3d_formation_energy_peratom") fetches that jarvis-leaderboard split as `split_file`.
    Example: the Matformer JARVIS formation-energy test set is
    `load_public_dataset("jarvis_dft_3d_2021", "formation_energy_peratom", "test",
    leaderboard_benchmark="dft_3d_formation_energy_peratom")`.
    """
    common = dict(cache_dir=cache_dir, progress=progress, opener=opener)
    if name == "gnome":
        from dpf_jax.data import gnome

        if task is not None or split is not None or transform is not None:
            raise ValueError("gnome: no task/split/transform; pass targets= (summary columns) instead")
        summary = fetch("gnome_summary", **common)
        structures = fetch("gnome_by_id", **common)
        return gnome.read_gnome(summary, structures, progress=progress, **reader_kwargs)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(DATASETS)} or 'gnome'")
    spec = DATASETS[name]
    if spec.reader not in ("jarvis", "mp"):
        raise ValueError(f"{name}: not a dataset on its own (reader {spec.reader!r}); use name='gnome'")
    if leaderboard_benchmark is not None:
        if split_file is not None:
            raise ValueError("pass split_file= or leaderboard_benchmark=, not both")
        split_file = fetch_leaderboard_split(leaderboard_benchmark, **common)
    path = fetch(name, extract=extract, **common)
    read = readers.read_jarvis_json if spec.reader == "jarvis" else readers.read_mp_json
    return read(path, task, split, transform, split_file=split_file, progress=progress, **reader_kwargs)
