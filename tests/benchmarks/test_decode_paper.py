"""The paper's decoding protocol (`evals/bench_decode.py --protocol paper`): relative maximum
batch from megamor.plan's memory model, request lengths, and a whole run on tiny configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from megamor.benchmarks.decode import main
from megamor.benchmarks.decode_paper import paper_requests, relative_batch

ROOT = Path(__file__).resolve().parents[2]
TINY = {"vocab_size": 211, "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128, "max_seq_len": 128}


def test_relative_maximum_batch_360m():
    """The paper's 42/48/51 (H100): megamor's memory model gives 42/47/47 against vanilla and 50
    for MoR-4 against the 34-layer vanilla."""
    size = str(ROOT / "configs/model/360m")
    got = [relative_batch(size, f"mor_expert_{n}", "vanilla", 32, "h100", 2048) for n in (2, 3, 4)]
    assert got == [42, 47, 47]
    assert relative_batch(size, "mor_expert_4", "vanilla_as_mor_expert_4", 32, "h100", 2048) == 50


def test_requests_have_no_prefix_and_normal_lengths():
    reqs = paper_requests(400, 1, 20, 4, 100)
    lengths = [n for _, n in reqs]
    assert all(len(p) == 1 for p, _ in reqs) and min(lengths) >= 1
    assert 19 < sum(lengths) / len(lengths) < 21 and len(set(lengths)) > 8
    assert reqs == paper_requests(400, 1, 20, 4, 100)


def _tiny_size(folder: Path) -> Path:
    (folder / "vanilla.yaml").write_text(yaml.safe_dump({**TINY, "n_layers": 4}))
    for n in (2, 3, 4):
        cfg = {**TINY, "n_layers": 2 + 2 * n, "sharing": "middle_cycle", "num_recursions": n,
               "router": {"type": "expert_choice"}}
        (folder / f"mor_expert_{n}.yaml").write_text(yaml.safe_dump(cfg))
    return folder


def test_paper_protocol_run(tmp_path, capsys):
    size = _tiny_size(tmp_path)
    out = tmp_path / "paper.md"
    assert main(["--protocol", "paper", "--size", str(size), "--device", "cpu", "--requests", "12", "--batch", "4",
                 "--gen-mean", "6", "--gen-std", "2", "--repeats", "1", "--warmup", "0", "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    names = {r.split(" | ")[0][2:].split(" (")[0] for r in rows}
    assert names == {"vanilla", "mor_expert_2", "mor_expert_3", "mor_expert_4", "vanilla_as_mor_expert_4"}
    for r in rows:
        cells = [c.strip() for c in r.split("|")]
        model, schedule, steady = cells[1], cells[3], cells[11]
        if model.startswith("mor") and schedule == "depthwise":
            assert float(steady) == 1.0  # the block always ran a full batch while requests waited
        if model.startswith("mor") and schedule == "lockstep":
            assert float(steady) < 0.9
    assert sum("relative max" in r for r in rows) == 6  # MoR-2/3/4, both schedules
    assert "prompt 1" in out.read_text()  # no prefix by default


def test_paper_protocol_bad_input_exit_2(tmp_path, capsys):
    """Bad arguments and an unknown variant: exit 2 and one line, no traceback (in process: the
    entry point `evals/bench_decode.py` is `sys.exit(main())`)."""
    size = _tiny_size(tmp_path)
    base = ["--protocol", "paper", "--size", str(size), "--device", "cpu"]
    with pytest.raises(SystemExit) as exc:
        main(base + ["--requests", "0"])
    assert exc.value.code == 2 and "--requests: must be >= 1" in capsys.readouterr().err
    assert main(base + ["--variants", "mor_expert_9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mor_expert_9" in err[0] and err[0].startswith("bench_decode: ")


def test_profile_counts_the_engines_linears():
    """The engine runs its linears on oneDNN-packed weights on a CPU: the profile column counts
    those calls too (it read 0 linear calls once they moved off torch's linear)."""
    import torch

    from megamor.benchmarks.decode_paper import linear_profile
    from megamor.model import MoRLM
    from tests.model.helpers import tiny_config

    torch.manual_seed(0)
    model = MoRLM(tiny_config(n_layers=2)).eval()
    text = linear_profile(model, paper_requests(4, 1, 3, 1, 100), 2, "lockstep")
    assert int(text.split()[0]) > 0, text
    assert text.endswith("admissions 0%"), text  # one-token prompts: no prefill forward at all
    longer = linear_profile(model, paper_requests(4, 6, 3, 1, 100), 2, "lockstep")
    assert int(longer.rsplit(" ", 1)[1].rstrip("%")) > 0, longer  # 5 prompt tokens each through the forward


def test_rows_are_timed_round_robin():
    """Warmup rounds, then each timed round runs every row once, then one write-timed run per
    row: a drifting machine moves every row of a round alike (sequential rows gave a MoR/vanilla
    ratio anywhere in 1.01x-1.19x on the shared CPU)."""
    import torch

    from megamor.benchmarks.decode_paper import RowSpec, measure_rows
    from megamor.model import MoRLM
    from tests.model.helpers import tiny_config

    calls: list[tuple[str, bool]] = []

    class Logged(RowSpec):
        def run(self, requests, time_writes=False):
            calls.append((self.schedule, time_writes))
            return super().run(requests, time_writes)

    torch.manual_seed(0)
    model = MoRLM(tiny_config(n_layers=2)).eval()
    reqs = paper_requests(4, 1, 3, 1, 211)
    res = measure_rows([Logged(model, 2, "lockstep"), Logged(model, 2, "depthwise")], reqs, warmup=1, repeats=2)
    a, b = ("lockstep", False), ("depthwise", False)
    assert calls == [a, b, a, b, a, b, ("lockstep", True), ("depthwise", True)]
    assert [r["tokens"] for r in res] == [sum(n for _, n in reqs)] * 2


def test_static_rows_are_labelled(tmp_path):
    size = _tiny_size(tmp_path)
    out = tmp_path / "paper.md"
    assert main(["--protocol", "paper", "--size", str(size), "--device", "cpu", "--requests", "6", "--batch", "2",
                 "--gen-mean", "3", "--gen-std", "1", "--repeats", "1", "--warmup", "0", "--variants", "vanilla",
                 "mor_expert_3", "--static", "--depth-buckets", "1.25", "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    labels = {(r.split(" | ")[0][2:].split(" (")[0], r.split(" | ")[2]) for r in rows}
    assert labels == {("vanilla", "lockstep, static"), ("vanilla", "depthwise, static"),
                      ("mor_expert_3", "lockstep, static"), ("mor_expert_3", "depthwise, static, depth buckets x1.25")}
