"""Tokenize-and-shard: plan the units, tokenize this task's share with N processes, finalize.

Output folder:
  plan.json                   inputs, settings, unit list (written first; identifies the run)
  parts/                      stage-1 outputs per unit (deleted after finalize unless kept)
  train-00000.npy ...         shards (see shards.py), valid-00000.npy ...
  manifest.json               written last: its presence means the folder is complete
  report.json                 statistics and timings of the last invocation

Same inputs and settings give byte-identical shards and manifest whatever the worker count,
task split, or unit size. With --num-tasks N each task only writes parts; `merge_shards`
(finalize) then produces what a single task would have.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from megamor.data.errors import DataError, OutputExistsError
from megamor.data.finalize import finalize
from megamor.data.manifest import MANIFEST, PLAN, REPORT, canonical_hash
from megamor.data.readers import ReadOptions, ReadStats
from megamor.data.shards import token_dtype
from megamor.data.sources import Source, Unit, assign_units, plan_units, resolve_sources
from megamor.data.tokenize_units import UnitJob, init_worker, read_done, run_unit, set_progress
from megamor.data.tokenizer import Tokenizer, load_tokenizer
from megamor.utils.atomic import is_temp, remove_temps, write_json

PLAN_FORMAT = "megamor-plan"
OUR_FILES = (MANIFEST, PLAN, REPORT)


@dataclass
class ShardSettings:
    shard_tokens: int = 1 << 26  # 64 Mi tokens: 128 MiB shards in uint16
    valid_fraction: float = 0.005  # share of documents (by keyed content hash) in the valid split
    split_seed: int = 0
    read: ReadOptions = field(default_factory=ReadOptions)
    unit_bytes: int = 1 << 26  # work-unit size for splittable files; does not change the output
    unit_rows: int = 100_000  # work-unit size for HF datasets; does not change the output
    # Input files (or folders) held out whole as the valid split: every document of a listed file
    # is a valid document, whatever valid_fraction decides for the other files' documents.
    valid_files: tuple[str, ...] = ()

    def check(self) -> None:
        if self.shard_tokens < 1:
            raise DataError(f"shard_tokens must be >= 1, got {self.shard_tokens}")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise DataError(f"valid_fraction must be in [0, 1), got {self.valid_fraction}")
        if self.unit_bytes < 1 or self.unit_rows < 1:
            raise DataError("unit_bytes and unit_rows must be >= 1")

    def output_settings(self) -> dict[str, Any]:
        out = {
            "shard_tokens": self.shard_tokens, "valid_fraction": self.valid_fraction, "split_seed": self.split_seed,
            **asdict(self.read),
        }
        if self.valid_files:  # only when used: folders made before the option keep their fingerprint
            out["valid_files"] = sorted(str(Path(f).expanduser().resolve()) for f in self.valid_files)
        return out


def held_out_sources(valid_files: Sequence[str], sources: Sequence[Source], hf_split: str) -> set[int]:
    """Indices of the sources that --valid-files names (files, or folders of them); every name
    must be one of the inputs."""
    paths = {s.path: i for i, s in enumerate(sources)}
    held: set[int] = set()
    for spec in valid_files:
        named, _ = resolve_sources([spec], hf_split=hf_split, allow_empty=True)
        for src in named:
            if src.path not in paths:
                raise DataError(f"--valid-files: {src.path} is not one of the inputs (give it as an input too)")
            held.add(paths[src.path])
    if held and len(held) == len(sources):
        raise DataError("--valid-files names every input: nothing would be left for the train split")
    return held


@dataclass
class ShardResult:
    out_dir: Path
    manifest: dict[str, Any] | None  # None when this was one task of several (merge pending)
    stats: ReadStats
    units_done: int  # tokenized by this invocation
    units_reused: int  # already done by an earlier, interrupted invocation
    seconds: float
    input_bytes: int
    tokens: int

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / 1e6 / max(self.seconds, 1e-9)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def make_plan(inputs: Sequence[str], tok: Tokenizer, s: ShardSettings, hf_split: str, allow_empty: bool) -> dict[str, Any]:
    sources, skipped = resolve_sources(inputs, hf_split=hf_split, allow_empty=allow_empty)
    held = held_out_sources(s.valid_files, sources, hf_split)
    units = plan_units(sources, s.read.txt_mode, s.unit_bytes, s.unit_rows)
    dtype = token_dtype(tok.vocab_size).name
    tok_info = {k: v for k, v in tok.info().items() if k != "path"}
    run = {"tokenizer": tok_info, "dtype": dtype, "settings": s.output_settings(),
           "sources": [src.identity() for src in sources]}
    run_fp = canonical_hash(run)
    plan = {
        "format": PLAN_FORMAT, "version": 1,
        "run_fingerprint": run_fp,
        "fingerprint": canonical_hash([run_fp, s.unit_bytes, s.unit_rows]),
        **run,
        "settings": {**s.output_settings(), "unit_bytes": s.unit_bytes, "unit_rows": s.unit_rows},
        "tokenizer": {**tok_info, "path": str(tok.path)},
        "units": [asdict(u) for u in units],
        "held_out_sources": sorted(held),
        "skipped_empty_inputs": skipped,
    }
    return plan


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What makes an existing plan or manifest another run than `new` (a plan), for the error."""
    diffs = []
    if old.get("tokenizer", {}).get("hash") != new["tokenizer"]["hash"]:
        diffs.append("another tokenizer")
    if old.get("dtype") != new["dtype"]:
        diffs.append(f"dtype: {old.get('dtype')} -> {new['dtype']}")
    old_settings = old.get("settings", {})
    for k, v in new["settings"].items():
        if k in old_settings and old_settings[k] != v:
            diffs.append(f"settings.{k}: {old_settings[k]!r} -> {v!r}")

    def files(d: dict[str, Any]) -> list[tuple[Any, Any]]:
        return [(s.get("path"), s.get("size")) for s in d.get("sources", [])]

    if files(old) != files(new):
        diffs.append("other input files")
    return "; ".join(diffs) or "the input files were modified since"


def _clean(out: Path) -> None:
    """Remove what a tokenize_and_shard run writes (and nothing else)."""
    for name in OUR_FILES:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "parts", ignore_errors=True)
    for p in out.glob("*.npy"):
        if p.name.startswith(("train-", "valid-")):
            p.unlink()
    remove_temps(out)


def _foreign(out: Path) -> list[str]:
    """Entries a tokenize_and_shard run would not have written (other tasks of an array may be
    creating plan.json or parts/ right now: those are not foreign)."""
    ours = ("parts", *OUR_FILES)
    return sorted(p.name for p in out.iterdir()
                  if not (p.name in ours or is_temp(p) or p.name.startswith(("train-", "valid-", "report"))))


def prepare_output(out: Path, plan: dict[str, Any], overwrite: bool) -> bool:
    """Make `out` ready for this plan; True if it already holds this run's finished output."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    manifest, old_plan = out / MANIFEST, out / PLAN
    if manifest.is_file():
        old = json.loads(manifest.read_text())
        if old.get("run_fingerprint") == plan["run_fingerprint"]:
            return True  # this very run finished earlier (even with overwrite: nothing to replace)
    if manifest.is_file() and not overwrite:
        raise OutputExistsError(f"{out} holds another run's manifest ({_differences(old, plan)}); "
                                "pass --overwrite to replace it")
    if old_plan.is_file() and not overwrite:
        old = json.loads(old_plan.read_text())
        if old.get("fingerprint") != plan["fingerprint"]:
            raise OutputExistsError(f"{out} holds an unfinished run with other inputs or settings "
                                    f"({_differences(old, plan)}); pass --overwrite to replace it")
    elif not overwrite and _foreign(out):
        raise OutputExistsError(f"{out} is not empty and is not a tokenize_and_shard folder (holds "
                                f"{', '.join(_foreign(out)[:3])}); choose an empty folder or pass --overwrite")
    elif not overwrite and (stale := sorted(p.name for p in out.glob("*.npy") if p.name.startswith(("train-", "valid-")))):
        # Shards with neither plan.json nor manifest.json: nothing says what they hold, so none
        # may be reused (a shard of the right size would be, silently mixing old data in).
        raise OutputExistsError(f"{out} holds shards ({', '.join(stale[:3])}) but no {PLAN} or {MANIFEST}: what they "
                                "hold is unknown; choose an empty folder or pass --overwrite (which deletes them)")
    if overwrite:
        _clean(out)
    if not old_plan.is_file() or overwrite:
        write_json(old_plan, plan)
    (out / "parts").mkdir(exist_ok=True)
    return False


class _Counters:
    """Bytes read and tokens written, shared with worker processes."""

    def __init__(self, ctx: Any):
        self.b = ctx.Value("q", 0)
        self.t = ctx.Value("q", 0)

    def __iter__(self):
        return iter((self.b, self.t))


def _progress_bar(total: int | None, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="tokenize", disable=not enabled,
                mininterval=0.5 if sys.stderr.isatty() else 30.0, file=sys.stderr)


def tokenize_and_shard(
    inputs: Sequence[str],
    out_dir: str | Path,
    tokenizer: str | Path,
    settings: ShardSettings | None = None,
    *,
    workers: int = 1,
    num_tasks: int = 1,
    task_index: int = 0,
    overwrite: bool = False,
    allow_empty_inputs: bool = False,
    hf_split: str = "train",
    keep_parts: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
) -> ShardResult:
    s = settings or ShardSettings()
    s.check()
    if workers < 1:
        raise DataError(f"workers must be >= 1, got {workers}")
    if overwrite and num_tasks > 1:
        raise DataError("--overwrite with --num-tasks > 1 would let tasks delete each other's work; "
                        "empty the folder once before submitting the array")
    t0 = time.time()
    out = Path(out_dir)
    tok = load_tokenizer(tokenizer)
    if tok.eos_id < 0:
        raise DataError(f"{tok.path}: the tokenizer has no EOS piece, which separates documents in the shards")
    plan = make_plan(inputs, tok, s, hf_split, allow_empty_inputs)
    for p in plan["skipped_empty_inputs"]:
        log(f"warning: skipping empty input {p}")
    if prepare_output(out, plan, overwrite):
        log(f"{out}: already complete (same inputs and settings); nothing to do")
        m = json.loads((out / MANIFEST).read_text())
        return ShardResult(out, m, ReadStats.from_dict(m["stats"]), 0, 0, time.time() - t0, 0, 0)

    sources = [Source(**d) for d in plan["sources"]]
    parts = out / "parts"
    mine = assign_units([Unit(**u) for u in plan["units"]], num_tasks, task_index)
    for u in mine:  # temp files of this task's units left by a killed earlier attempt
        remove_temps(parts, prefix=u.name + ".")
    todo = [u for u in mine if read_done(parts, u, plan["fingerprint"], plan["dtype"]) is None]
    held = set(plan["held_out_sources"])
    jobs = [UnitJob(str(parts), plan["fingerprint"], str(tok.path), plan["dtype"], tok.eos_id, s.read,
                    s.valid_fraction, s.split_seed, sources[u.source], u, valid_source=u.source in held) for u in todo]
    jobs.sort(key=lambda j: (-j.unit.size, j.unit.index))  # big units first: better balance
    compressed = any(sources[u.source].compression for u in todo)
    total = None if compressed else sum(u.size for u in todo)
    results = _run_jobs(jobs, workers, total, progress)

    stats = ReadStats()
    for r in results:
        stats.add(ReadStats.from_dict(r["stats"]))
    tokens = sum(r["train"]["tokens"] + r["valid"]["tokens"] for r in results)
    manifest = None
    if num_tasks == 1:
        manifest = finalize(out, keep_parts=keep_parts)
        stats = ReadStats.from_dict(manifest["stats"])
    res = ShardResult(out, manifest, stats, len(todo), len(mine) - len(todo), time.time() - t0,
                      sum(r["stats"]["input_bytes"] for r in results), tokens)
    _write_report(out, res, workers, num_tasks, task_index)
    for line in summary_lines(res, num_tasks, task_index):
        log(line)
    return res


def _mp_context() -> Any:
    """fork when it is safe (a single-threaded parent without torch: the data_prep tools), as it
    starts workers ~10x faster; else spawn (e.g. inside a training process or pytest)."""
    import threading

    if sys.platform == "linux" and threading.active_count() == 1 and "torch" not in sys.modules:
        return mp.get_context("fork")
    return mp.get_context("spawn")


def _run_jobs(jobs: list[UnitJob], workers: int, total: int | None, progress: bool) -> list[dict[str, Any]]:
    ctx = _mp_context()  # before the progress bar, which may start a monitor thread
    bar = _progress_bar(total, progress and bool(jobs))
    counters = _Counters(ctx)
    shown = [0, 0]
    t0 = time.time()

    def refresh() -> None:
        b, t = counters.b.value, counters.t.value
        bar.update(b - shown[0])
        shown[:] = [b, t]
        dt = max(time.time() - t0, 1e-9)
        bar.set_postfix_str(f"{b / 1e6 / dt:.1f} MB/s, {t / dt / 1e6:.2f} M tokens/s", refresh=False)

    try:
        if workers == 1 or len(jobs) <= 1:
            set_progress(tuple(counters))
            results = []
            for j in jobs:
                results.append(run_unit(j))
                refresh()
            set_progress(None)
            return results
        with ctx.Pool(min(workers, len(jobs)), initializer=init_worker, initargs=(tuple(counters),)) as pool:
            pending = [pool.apply_async(run_unit, (j,)) for j in jobs]
            results = []
            for a in pending:
                while not a.ready():
                    a.wait(0.25)
                    refresh()
                results.append(a.get())  # re-raises a worker's error here
            refresh()
            return results
    finally:
        refresh()
        bar.close()


def _write_report(out: Path, res: ShardResult, workers: int, num_tasks: int, task_index: int) -> None:
    name = REPORT if num_tasks == 1 else f"report.task-{task_index:05d}.json"
    write_json(out / name, {
        "stats": res.stats.to_dict(), "units_tokenized": res.units_done, "units_reused": res.units_reused,
        "seconds": round(res.seconds, 3), "input_MB_per_s": round(res.mb_per_s, 3),
        "tokens_per_s": round(res.tokens_per_s, 1), "workers": workers, "num_tasks": num_tasks, "task_index": task_index,
    })


def summary_lines(res: ShardResult, num_tasks: int = 1, task_index: int = 0) -> list[str]:
    st = res.stats
    lines = [(f"{res.out_dir}: tokenized {res.units_done} units ({res.units_reused} reused) in {res.seconds:.1f}s, "
              f"{res.mb_per_s:.2f} MB/s, {res.tokens_per_s / 1e6:.2f} M tokens/s")]
    lines.append(f"documents: {st.documents} kept, {st.empty_skipped} empty skipped, "
                 f"{st.bad_lines_skipped} bad lines skipped, {st.replaced_chars} invalid UTF-8 sequences replaced")
    lines += [f"  bad line: {e}" for e in st.bad_line_examples]
    if res.manifest is not None:
        for split, d in res.manifest["splits"].items():
            lines.append(f"{split}: {d['tokens']} tokens, {d['documents']} documents, {len(d['shards'])} shards")
        if res.manifest["settings"]["valid_fraction"] > 0 and res.manifest["splits"]["valid"]["documents"] == 0:
            lines.append("warning: the valid split is empty (too few documents for valid_fraction; "
                         "for .txt books try --txt-mode paragraph, or --valid-files)")
    else:
        lines.append(f"task {task_index} of {num_tasks} done; run merge_shards.py {res.out_dir} once all tasks finished")
    return lines
