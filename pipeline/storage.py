"""Atomic writes and the project's file layout: an interrupted stage never leaves half a file."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import pandas as pd

# ingest's output: a folder of parquet shards (id, origin, src, tgt), read in name order.
RAW_PAIRS = Path("data/raw/pairs")
PREPARED = Path("data/prepared")
# prepare writes it last: the md5 of each of its files, so that training can fingerprint its
# inputs without reading them.
PREPARED_MANIFEST = PREPARED / "manifest.json"
SPLITS = ("train", "valid", "test")
EMBEDDINGS = Path("models/embeddings")
SEQ2SEQ = Path("models/seq2seq")
MODEL_FILE = SEQ2SEQ / "model.pt"
# The MLflow run of the model in models/seq2seq. Not a DVC output: a run id is local to one
# tracking store, and would make dvc.lock differ on every machine.
RUN_FILE = Path(".vamos/run.json")
CHECKPOINTS = Path(".vamos/checkpoints")
REPORTS = Path("reports")
PLOTS = REPORTS / "plots"


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def raw_shards(root: Path = RAW_PAIRS) -> list[Path]:
    """ingest's shards, in the corpus's order."""
    return sorted(Path(root).glob("part-*.parquet"))


def read_raw_pairs(root: Path = RAW_PAIRS) -> pd.DataFrame:
    """ingest's shards as one frame, in order (for tests and small tools: a stage streams them)."""
    import pandas as pd

    shards = raw_shards(root)
    if not shards:
        raise FileNotFoundError(f"{root}: no shards of pairs (part-*.parquet) here: run `vamos ingest` first")
    return pd.concat([pd.read_parquet(shard) for shard in shards], ignore_index=True)


def split_path(split: str, root: Path = PREPARED) -> Path:
    return root / f"{split}.parquet"


@contextmanager
def atomic_path(path: str | Path, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds.

    The file gets `mode`, by default the one a plain `open` would give (0644 under the usual umask;
    mkstemp's 0600 would hide outputs from teammates and service accounts), and reaches the disk
    before the rename, and the rename before we return: a crash leaves the old file or the new one.
    The temporary file is 0600 from its creation on, so a private file is never readable by others."""
    path = Path(path)
    with naming_the_output(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(tmp)
        try:
            yield tmp
            os.chmod(tmp, 0o666 & ~current_umask() if mode is None else mode)
            fsync(tmp)
            os.replace(tmp, path)
            fsync(path.parent)
        finally:
            tmp.unlink(missing_ok=True)


@contextmanager
def naming_the_output(path: Path) -> Iterator[None]:
    """An OSError while making `path` that does not name it (a full disk's write error names no
    file; pyarrow's names none either) is raised again naming it, so the user knows which output
    and which filesystem failed."""
    try:
        yield
    except OSError as error:
        if str(path) in str(error):
            raise
        at = f" ({error.filename})" if error.filename else ""  # a parent folder, say, at fault
        message = f"cannot write {path}: {error.strerror or error}{at}"
        raise (OSError(error.errno, message) if error.errno else OSError(message)) from error


def remove_leftovers(path: str | Path) -> None:
    """Remove the temporary folders that a killed run left beside `path` (SIGKILL, or a timeout's
    SIGTERM, skips the clean-up of temporary_folder_beside): they may hold a copy of the corpus."""
    path = Path(path)
    for folder in path.parent.glob(f".{path.name}.*"):
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def temporary_folder_beside(path: str | Path, purpose: str) -> Iterator[Path]:
    """A new empty folder beside `path` (on its filesystem, which workers may share), removed after."""
    path = Path(path)
    with naming_the_output(path):  # mkdtemp's error names the temporary folder, not the output
        path.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{purpose}."))
    os.chmod(folder, 0o777 & ~current_umask())  # mkdtemp's 0700 would hide it from teammates
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a new folder beside `path` to fill; it replaces `path` whole only if the block succeeds."""
    with naming_the_output(Path(path)), temporary_folder_beside(path, "new") as folder:
        yield folder
        replace_folder(folder, Path(path))


RENAME_EXCHANGE = 2  # linux/fs.h: swap two paths atomically
AT_FDCWD = -100


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2); False where the system or the
    filesystem cannot."""
    import ctypes
    import errno

    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(error, os.strerror(error), str(b))


def replace_folder(new: Path, path: Path) -> None:
    """Put folder `new` (its files already flushed to the disk) at `path`; the old folder, if any,
    ends up at `new` for the caller to remove. A crash leaves the old folder or the new one at
    `path`; where the filesystem cannot swap two paths at once, a crash between two renames leaves
    none there and the old one beside it."""
    fsync(new)
    if not path.exists():
        os.rename(new, path)
    elif not exchange_paths(new, path):
        old = new.with_name(new.name + ".old")
        os.rename(path, old)
        os.rename(new, path)
        os.rename(old, new)
    fsync(path.parent)


def current_umask() -> int:
    """The process umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries (a rename), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def parquet_batches(path: str | Path, columns: list[str], batch_rows: int = 65_536) -> Iterator:
    """A parquet file's record batches of `columns`, in bounded memory: with pyarrow's default
    pre-buffering, iterating a whole file keeps what it read (1,670 MB for a 10M-pair
    train.parquet's one column, 281 MB without: docs/benchmarks.md)."""
    import pyarrow.parquet as pq

    with pq.ParquetFile(path, pre_buffer=False) as parquet:
        yield from parquet.iter_batches(batch_size=batch_rows, columns=columns)


def file_md5(path: str | Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_parquet(path: str | Path, frame) -> None:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


# Drawn where DejaVu Sans lacks a glyph: Chinese and Japanese labels (attention heatmaps, word
# projections). Debian's fonts-droid-fallback, which scripts/setup.sh installs; named by its file,
# since matplotlib's font cache may predate its install.
CJK_FONT_FILE = Path("/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf")


@functools.cache
def pyplot():
    """matplotlib.pyplot, headless, with CJK_FONT_FILE's font as the fallback where it is installed
    (elsewhere a CJK label is drawn as boxes, and matplotlib warns)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import font_manager

    if CJK_FONT_FILE.exists():
        font_manager.fontManager.addfont(str(CJK_FONT_FILE))
        fallback = font_manager.FontProperties(fname=str(CJK_FONT_FILE)).get_name()
        matplotlib.rcParams["font.family"] = ["DejaVu Sans", fallback]
    import matplotlib.pyplot as plt

    return plt


def save_figure(path: str | Path, figure) -> None:
    plt = pyplot()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", dpi=110, bbox_inches="tight")
    plt.close(figure)


class NoRemote(RuntimeError):
    pass


def default_remote(project: str | Path = ".") -> tuple[str, str]:
    """The default DVC remote's name and URL, with .dvc/config.local (and user configs) applied
    and a local path resolved the way DVC does (relative to the config file, `~` expanded)."""
    from dvc.config import Config

    config = Config(dvc_dir=Path(project) / ".dvc")
    name = config["core"].get("remote")
    if not name or name not in config["remote"]:
        raise NoRemote("no default DVC remote: add one with `dvc remote add -d NAME URL`")
    return name, str(config["remote"][name]["url"])


def push(project: str | Path = ".") -> subprocess.CompletedProcess:
    """`dvc push` every output in dvc.lock to the default remote, creating a local remote's directory."""
    _, url = default_remote(project)
    if not re.match(r"\w+://", url):  # a local path, not s3:// or the like
        Path(url).mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, "-m", "dvc", "push"], cwd=project, capture_output=True, text=True)
