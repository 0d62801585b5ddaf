"""The markdown report (and its JSON twin): parity table, speed table, the measurements behind
the speed figures, and how each part ran; plus the run's verdict and exit code.

Verdict: the run fails (exit 1) when a parity check failed, raised or was cut by its time limit.
A skipped check (flash-attn not installed, a CUDA-only check on a CPU) is listed with its reason
and does not fail the run. Speed figures below their targets are reported as "short" and fail
the run only with --strict: the targets are goals to work towards, not regressions.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from megamor.gpu_check.common import ERROR, FAIL, MEASURE, META, PARITY, SHORT, SPEED, TIMED_OUT
from megamor.gpu_check.runner import PartResult, seconds_text

BAD_PARITY = (FAIL, ERROR, TIMED_OUT)
BAD_SPEED = (SHORT, ERROR, TIMED_OUT)


def records(results: list[PartResult], kind: str) -> list:
    return [r for res in results for r in res.records if r.kind == kind]


def exit_code(results: list[PartResult], strict: bool) -> int:
    bad = [r for r in records(results, PARITY) if r.status in BAD_PARITY]
    if strict:
        bad += [r for r in records(results, SPEED) if r.status in BAD_SPEED]
    return 1 if bad else 0


def _cell(text: Any) -> str:
    return str(text if text is not None else "").replace("|", "/").replace("\n", " ")


def _table(rows: list, header: str) -> list[str]:
    out = [header, _rule(header)]
    for r in rows:
        out.append(f"| {_cell(r.name)} | {_cell(r.figure)} | {_cell(r.target)} | **{_cell(r.status)}** | {_cell(r.note)} |")
    return out


def _rule(header: str) -> str:
    return "|" + "---|" * (header.count("|") - 1)


def _meta(results: list[PartResult]) -> dict:
    return next((res.meta for res in results if res.meta), {})


def markdown(results: list[PartResult], info: dict[str, Any], code: int) -> str:
    meta = _meta(results)
    parity, speed = records(results, PARITY), records(results, SPEED)
    counts = lambda rows: ", ".join(f"{sum(r.status == s for r in rows)} {s}"  # noqa: E731
                                    for s in dict.fromkeys(r.status for r in rows))
    cuda = f", CUDA {meta['cuda']}" if meta.get("cuda") else ""
    lines = [
        f"# megamor GPU check{' (--tiny, CPU)' if info['tiny'] else ''}",
        "",
        (f"- result: **{'PASS' if code == 0 else 'FAIL'}** (exit {code}); parity: {counts(parity) or 'none run'}; "
         f"speed: {counts(speed) or 'none run'}"),
        f"- device: {meta.get('device', 'unknown (no part started)')}",
        f"- torch {meta.get('torch', '?')}{cuda}, Python {meta.get('python', '?')}",
        f"- commit: {info['commit']}",
        f"- command: `{info['command']}`",
        f"- started {info['started']} UTC; wall time {info['wall_s']:.0f} s of a {info['budget_s']:.0f} s budget",
    ]
    if info["tiny"]:
        lines.append("- --tiny: toy models on the CPU so the check cannot rot; CUDA-only checks are skipped with the "
                     "reason, and speed targets (set for the GPU) read 'n/a on CPU'")
    header = "| check | figure | target | status | notes |"
    lines += ["", "## Parity", "", *_table(parity, header), "", "## Speed (GPU targets: bf16, 989 TFLOP/s basis)", "",
              *_table(speed, header)]
    meas = records(results, MEASURE)
    if meas:
        lines += ["", "### Measurements behind the speed figures", "",
                  ("| run | result | params (M) | batch x seq | step (s) | tokens/s | TFLOP/step | MFU | peak mem (GB) | "
                   "warm-up incl. compile (s) | tokens per recursion step | notes |"),
                  "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|---|"]
        for r in meas:
            d = r.data
            if "step_s" in d and "flops" in d:
                mem = f"{d['peak_mem_gb']:.1f}" if d.get("peak_mem_gb") is not None else "n/a"
                lines.append(
                    f"| {_cell(r.name)} | {_cell(r.figure)} | {d['params_m']:.1f} | {d['batch']} x {d['seq']} | "
                    f"{d['step_s']:.4f} | {d['tokens'] / d['step_s']:,.0f} | {d['flops'] / 1e12:.3g} | "
                    f"{100 * d['mfu']:.1f}% | {mem} | {d['warmup_s']:.1f} | {d.get('tokens_per_step') or ''} | "
                    f"{_cell(r.note)} |")
            else:
                lines.append(f"| {_cell(r.name)} | {_cell(r.figure or r.status)} | | | | | | | | | | {_cell(r.note)} |")
    lines += ["", "## Parts", "", "| part | kind | outcome | seconds | limit (s) | notes |", "|---|---|---|---:|---:|---|"]
    for res in results:
        limit = seconds_text(res.limit) if res.limit else "-"
        lines.append(f"| {res.part.name} | {res.part.kind} | {res.outcome} | {res.seconds:.1f} | {limit} | "
                     f"{_cell(res.note)} |")
    lines += ["", (f"Log of every part: `{info['log']}`. Exit code: 1 when a parity check failed, raised or timed out"
                   " (skips do not fail); speed shortfalls fail only with --strict.")]
    return "\n".join(lines) + "\n"


def as_json(results: list[PartResult], info: dict[str, Any], code: int) -> dict:
    return {"info": info, "exit_code": code, "meta": _meta(results),
            "parts": [{"part": res.part.name, "kind": res.part.kind, "outcome": res.outcome, "seconds": res.seconds,
                       "limit": res.limit, "note": res.note} for res in results],
            "records": [asdict(r) for res in results for r in res.records if r.kind != META]}
