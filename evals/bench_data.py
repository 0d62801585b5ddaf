"""Data pipeline benchmark (not a test).

1. Tokenize-and-shard throughput (input MB/s, tokens/s, end to end: plan, tokenize, write
   shards, manifest) on the Gutenberg books with 1 and 2 workers, for each tokenizer kind
   (a sentencepiece BPE and a Hugging Face byte-level BPE, both trained here at --vocab-size),
   next to a plain single-process encode loop over the same documents with each, run
   interleaved in the same invocation (ratios are against the sentencepiece loop: that is
   what matters on a shared machine), with peak memory (RSS of the largest process of each run).
2. Loader throughput (samples/s at seq 2048, one rank) against what training the 135M model
   consumes per GPU (training FLOPs/token from megamor.model.flops at an assumed MFU).

  .venv/bin/python evals/bench_data.py --out evals/results/data.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megamor.cli import ArgumentParser
from megamor.env import shared_data_dir

H200_BF16_PEAK = 989e12  # dense bf16 FLOP/s (H100/H200 SXM)


def _cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def child_baseline(files: list[str], tokenizer: str) -> dict:
    """The tokenizer library alone (sentencepiece or tokenizers): paragraphs of the normalised
    books, encoded one by one."""
    from megamor.data.tokenizer import load_tokenizer

    encode = load_tokenizer(tokenizer)._encode  # one library call per document
    docs = []
    for f in files:
        text = Path(f).read_bytes().decode("utf-8", "replace").lstrip("\ufeff").replace("\r\n", "\n")
        docs += [d for d in text.split("\n\n") if d.strip()]
    t0, c0 = time.perf_counter(), _cpu_seconds()
    tokens = sum(len(encode(d)) for d in docs)
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": _cpu_seconds() - c0, "tokens": tokens}


def child_shard(files: list[str], tokenizer: str, out: str, workers: int) -> dict:
    from megamor.data.pipeline import ShardSettings, tokenize_and_shard

    shutil.rmtree(out, ignore_errors=True)  # an identical finished run would be a no-op
    c0 = _cpu_seconds()
    r = tokenize_and_shard(files, out, tokenizer, ShardSettings(), workers=workers, overwrite=True,
                           progress=False, log=lambda m: None)
    tokens = sum(s["tokens"] for s in r.manifest["splits"].values())
    return {"seconds": r.seconds, "cpu_seconds": _cpu_seconds() - c0, "tokens": tokens}


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):  # the process ended meanwhile
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
    return out


def _hwm_mib(pid: int) -> float:
    """Peak RSS of a process since its exec (VmHWM; ru_maxrss would include the forking parent's)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_child(args: list[str]) -> dict:
    """Run one measurement in a fresh process, sampling the peak RSS of it and its workers."""
    p = subprocess.Popen([sys.executable, __file__, "--child", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    peak: dict[int, float] = {}
    while p.poll() is None:
        for pid in _tree(p.pid):
            peak[pid] = max(peak.get(pid, 0.0), _hwm_mib(pid))
        time.sleep(0.02)
    out, err = p.communicate()
    if p.returncode:
        raise RuntimeError(err)
    res = json.loads(out.strip().splitlines()[-1])
    res["peak_rss_mib"] = max(peak.values(), default=0.0)
    return res


def bench_loader(shards: str, seq_len: int, micro: int, steps: int, masking: bool) -> float:
    from megamor.data import DataConfig, build_train_loader

    cfg = DataConfig(train=[shards], seq_len=seq_len, document_masking=masking)
    ld = build_train_loader(cfg, global_batch_size=micro * 8, micro_batch_size=micro, dp_rank=0, dp_world_size=1)
    for _ in range(5):
        ld.next_batch()
    t0 = time.perf_counter()
    for _ in range(steps):
        ld.next_batch()
    return steps * micro / (time.perf_counter() - t0)


def consumption_135m(seq_len: int, mfu: float) -> list[tuple[str, float]]:
    """Samples/s one GPU consumes training the 135M models at `mfu` of H200 bf16 peak."""
    from megamor.model.config import load_model_config
    from megamor.model.flops import flops_per_token

    root = Path(__file__).resolve().parent.parent / "configs" / "model" / "135m"
    out = []
    for name in ("vanilla", "mor_expert_3"):
        cfg = load_model_config(root / f"{name}.yaml")
        train_flops = 3 * flops_per_token(cfg, seq_len)
        out.append((name, mfu * H200_BF16_PEAK / train_flops / seq_len))
    return out


def main() -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--corpus", default=str(shared_data_dir() / "gutenberg"), help="folder of .txt books")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--kinds", nargs="+", choices=("sentencepiece", "hf-bpe"), default=["sentencepiece", "hf-bpe"])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--loader-steps", type=int, default=200)
    p.add_argument("--mfu", type=float, default=0.5, help="assumed MFU of 135M training on an H200")
    p.add_argument("--out", help="write the markdown results here")
    a = p.parse_args()
    if a.child:
        mode, tokenizer, *rest = a.child
        if mode == "baseline":
            res = child_baseline(rest, tokenizer)
        else:
            res = child_shard(rest[2:], tokenizer, rest[0], int(rest[1]))
        print(json.dumps(res))
        return 0

    from megamor.data.tokenizer_train import train_tokenizer

    files = sorted(str(f) for f in Path(a.corpus).glob("*.txt"))
    mb = sum(Path(f).stat().st_size for f in files) / 1e6
    load0 = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    toks, tok_s = {}, {}
    for kind in a.kinds:
        t0 = time.perf_counter()
        toks[kind] = train_tokenizer(files, work / f"tok-{kind}", vocab_size=a.vocab_size, kind=kind)
        tok_s[kind] = time.perf_counter() - t0
    runs: dict[str, list[dict]] = {}
    for _ in range(a.repeats):  # interleaved, so machine load hits every configuration alike
        for kind, tok in toks.items():
            runs.setdefault(f"{kind}: encode loop", []).append(run_child(["baseline", str(tok.path), *files]))
            for w in a.workers:
                runs.setdefault(f"{kind}: tokenize_and_shard, {w} worker{'s' if w > 1 else ''}", []).append(
                    run_child(["shard", str(tok.path), str(work / f"shards-{kind}"), str(w), *files]))
    rows = []
    base = base_cpu = None
    for name, rs in runs.items():
        sec = statistics.median(r["seconds"] for r in rs)
        cpu = statistics.median(r["cpu_seconds"] for r in rs)
        mbs, toks = mb / sec, rs[0]["tokens"] / sec
        base, base_cpu = base or mbs, base_cpu or mb / cpu
        rows.append((name, sec, mbs, toks, mbs / base, cpu, (mb / cpu) / base_cpu, max(r["peak_rss_mib"] for r in rs)))
    loader = {m: bench_loader(str(work / f"shards-{a.kinds[0]}"), a.seq_len, a.micro_batch, a.loader_steps, m) for m in (False, True)}
    need = consumption_135m(a.seq_len, a.mfu)
    load1 = os.getloadavg()[0]

    cmd = "python evals/bench_data.py " + " ".join(sys.argv[1:])
    lines = [
        "## Data pipeline",
        "",
        f"Command: `{cmd}`  ",
        (f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
         f"Python {platform.python_version()}; load average {load0:.1f} at start, {load1:.1f} at end "
         "(shared machine: compare ratios, not absolutes).  "),
        (f"Corpus: {len(files)} Gutenberg books, {mb:.2f} MB; tokenizers: vocab {a.vocab_size} trained on it ("
         + ", ".join(f"{k} {s:.1f} s" for k, s in tok_s.items()) + f"); TOKENIZERS_PARALLELISM="
         f"{os.environ.get('TOKENIZERS_PARALLELISM', 'unset')}.  "),
        (f"Median of {a.repeats} interleaved runs. tokenize_and_shard times are end to end (plan, read, tokenize, "
         "split, write parts, shards, sha256, manifest); the encode loops time encode calls only; "
         "'vs loop' columns compare with the first row."),
        "",
        ("| run | wall s | input MB/s | tokens/s | wall vs loop | CPU s (all processes) | MB per CPU-s vs loop "
         "| peak RSS MiB (largest process) |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {n} | {s:.2f} | {m:.2f} | {t / 1e6:.2f} M | {r:.2f}x | {c:.2f} | {rc:.2f}x | {rss:.0f} |"
              for n, s, m, t, r, c, rc, rss in rows]
    lines += [
        "",
        (f"Loader, one rank, seq {a.seq_len}, micro-batch {a.micro_batch}, shuffled windows from memory-mapped "
         "shards (page cache warm):"),
        "",
        "| loader | samples/s | tokens/s |",
        "|---|---:|---:|",
    ]
    lines += [f"| document_masking={m} | {s:,.0f} | {s * a.seq_len / 1e6:.1f} M |" for m, s in loader.items()]
    lines += ["", (f"Training the 135M models consumes per H200 at {a.mfu:.0%} MFU (training FLOPs/token from "
                   "megamor.model.flops, seq 2048, bf16 dense peak 989 TFLOP/s):"), ""]
    lines += [f"- {n}: {s:,.0f} samples/s per GPU; the loader's margin is {loader[False] / s:,.0f}x "
              f"({loader[True] / s:,.0f}x with document masking)" for n, s in need]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        from megamor.eval.cli import write_text

        write_text(a.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
