"""Input sources (local files or Hugging Face datasets) and their division into work units.

A *unit* is a deterministic slice of one source (a byte range of an uncompressed line-based
file, a whole compressed or paragraph-mode file, a parquet row group, a row range of a HF
dataset). Units depend only on the inputs and `unit_bytes`/`unit_rows`, never on the number of
workers or tasks, so tokenizing units independently and concatenating their outputs in unit
order gives the same token stream however the work was spread.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from megamor.data.errors import DataError

TXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
COMPRESSIONS = {".gz": "gz", ".zst": "zst", ".zstd": "zst"}
TXT_MODES = ("file", "paragraph", "line")
HF_PREFIX = "hf:"
HF_DISK_PREFIX = "hf-disk:"


@dataclass(frozen=True)
class Source:
    kind: str  # txt | jsonl | parquet | hf | hf_disk
    path: str  # absolute file/folder path, or the hub dataset name for kind "hf"
    compression: str = ""  # "" | gz | zst
    size: int = 0  # bytes on disk (0 for hub datasets)
    mtime_ns: int = 0
    hf_config: str = ""
    hf_split: str = "train"

    def identity(self) -> dict[str, Any]:
        """What decides whether a rerun is the same run (includes mtime)."""
        return asdict(self)


@dataclass(frozen=True)
class Unit:
    index: int  # position in the global order
    source: int  # index into the source list
    start: int  # byte offset, row group, or row
    end: int  # exclusive; -1 means "to the end of the source"
    size: int  # approximate input bytes, for load balancing and progress

    @property
    def name(self) -> str:
        return f"{self.index:06d}"


def _file_kind(p: Path) -> tuple[str, str]:
    name = p.name.lower()
    compression = ""
    for suf, comp in COMPRESSIONS.items():
        if name.endswith(suf):
            compression, name = comp, name[: -len(suf)]
            break
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl", compression
    if name.endswith(TXT_SUFFIXES):
        return "txt", compression
    if name.endswith(".parquet") and not compression:
        return "parquet", ""
    raise DataError(
        f"{p}: unsupported input type; expected .txt/.jsonl (optionally .gz/.zst), .parquet, "
        "a saved Hugging Face dataset folder, or hf:NAME[:CONFIG]"
    )


def _is_saved_hf(p: Path) -> bool:
    return (p / "dataset_info.json").is_file() or (p / "state.json").is_file() or (p / "dataset_dict.json").is_file()


def _file_source(p: Path, allow_empty: bool) -> Source | None:
    kind, comp = _file_kind(p)
    st = p.stat()
    if st.st_size == 0:
        if allow_empty:
            return None
        raise DataError(f"{p}: input file is empty (a failed download?); pass --allow-empty-inputs to skip it")
    return Source(kind=kind, path=str(p), compression=comp, size=st.st_size, mtime_ns=st.st_mtime_ns)


def resolve_sources(
    specs: Sequence[str], hf_split: str = "train", allow_empty: bool = False
) -> tuple[list[Source], list[str]]:
    """Turn CLI inputs into sources, in the order given (folders expand to sorted files).

    Returns (sources, skipped empty files). Missing paths and unsupported types raise DataError.
    """
    out: list[Source] = []
    skipped: list[str] = []
    if not specs:
        raise DataError("no inputs given")
    for spec in specs:
        if spec.startswith(HF_PREFIX):
            name, _, config = spec[len(HF_PREFIX):].partition(":")
            if not name:
                raise DataError(f"{spec!r}: expected hf:NAME or hf:NAME:CONFIG")
            out.append(Source(kind="hf", path=name, hf_config=config, hf_split=hf_split))
            continue
        disk = spec.startswith(HF_DISK_PREFIX)
        p = Path(spec[len(HF_DISK_PREFIX):] if disk else spec).expanduser().resolve()
        if not p.exists():
            raise DataError(f"{spec}: input not found")
        if p.is_dir() and (disk or _is_saved_hf(p)):
            out.append(Source(kind="hf_disk", path=str(p), size=_tree_size(p), hf_split=hf_split))
        elif p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
            if not files:
                raise DataError(f"{spec}: input folder holds no files")
            for f in files:
                s = _file_source(f, allow_empty)
                if s is None:
                    skipped.append(str(f))
                else:
                    out.append(s)
        else:
            s = _file_source(p, allow_empty)
            if s is None:
                skipped.append(str(p))
            else:
                out.append(s)
    if not out:
        raise DataError(f"no non-empty inputs among {list(specs)}")
    return out, skipped


def _tree_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def load_hf(source: Source):
    """The `datasets.Dataset` of a HF source; a hub name that cannot be reached fails at once."""
    import datasets

    if source.kind == "hf_disk":
        ds = datasets.load_from_disk(source.path)
        if isinstance(ds, datasets.DatasetDict):
            if source.hf_split not in ds:
                raise DataError(f"{source.path}: saved dataset has splits {list(ds)}, not {source.hf_split!r}")
            ds = ds[source.hf_split]
        return ds
    offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        return datasets.load_dataset(source.path, source.hf_config or None, split=source.hf_split)
    except Exception as e:  # noqa: BLE001  datasets raises many types (ConnectionError, OfflineModeIsEnabled, ...)
        hint = (
            " The hub is unreachable in offline mode (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE=1)."
            if offline
            else ""
        )
        raise DataError(
            f"hf:{source.path}: cannot load the Hugging Face dataset ({type(e).__name__}: {e}).{hint} "
            "Download it where the hub is reachable, `ds.save_to_disk(DIR)`, and pass DIR instead."
        ) from None


def plan_units(sources: Sequence[Source], txt_mode: str, unit_bytes: int, unit_rows: int) -> list[Unit]:
    """Cut every source into units, in global order."""
    if txt_mode not in TXT_MODES:
        raise DataError(f"txt_mode must be one of {TXT_MODES}, got {txt_mode!r}")
    units: list[Unit] = []

    def add(src: int, start: int, end: int, size: int) -> None:
        units.append(Unit(index=len(units), source=src, start=start, end=end, size=size))

    for i, s in enumerate(sources):
        splittable = not s.compression and (s.kind == "jsonl" or (s.kind == "txt" and txt_mode == "line"))
        if s.kind in ("txt", "jsonl") and splittable:
            for start in range(0, s.size, unit_bytes):
                add(i, start, min(start + unit_bytes, s.size), min(unit_bytes, s.size - start))
        elif s.kind in ("txt", "jsonl"):
            add(i, 0, -1, s.size)
        elif s.kind == "parquet":
            import pyarrow.parquet as pq

            try:
                md = pq.ParquetFile(s.path).metadata
            except Exception as e:  # noqa: BLE001  pyarrow raises ArrowInvalid, OSError, NotImplementedError, ...
                raise DataError(f"{s.path}: not a readable parquet file ({e})") from None
            for g in range(md.num_row_groups):
                add(i, g, g + 1, md.row_group(g).total_byte_size)
        else:  # hf, hf_disk
            n = len(load_hf(s))
            per_row = max(1, s.size // max(n, 1)) if s.size else 1000
            for start in range(0, n, unit_rows):
                end = min(start + unit_rows, n)
                add(i, start, end, (end - start) * per_row)
    return units


def assign_units(units: Sequence[Unit], num_tasks: int, task_index: int) -> list[Unit]:
    """The units task `task_index` of `num_tasks` tokenizes: largest first to the least loaded task."""
    if num_tasks < 1 or not (0 <= task_index < num_tasks):
        raise DataError(f"task_index must be in [0, num_tasks); got {task_index} of {num_tasks}")
    load = [0] * num_tasks
    mine: list[Unit] = []
    for u in sorted(units, key=lambda u: (-u.size, u.index)):
        t = min(range(num_tasks), key=lambda k: (load[k], k))
        load[t] += max(u.size, 1)
        if t == task_index:
            mine.append(u)
    return sorted(mine, key=lambda u: u.index)
