"""Downstream evals in the training loop (eval.tasks): config faults at the door, the in-process
numbers against the offline harness, and real runs (1 and 2 gloo ranks) against the harness on
their saved checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from megamor.config import ConfigError
from megamor.env import repo_root
from megamor.eval.harness import evaluate
from megamor.eval.scoring import Scorer
from megamor.eval.tokenizer import load_tokenizer
from megamor.model import MoRLM
from megamor.train.config import load_experiment
from megamor.train.downstream import DownstreamEval
from megamor.train.preflight import check_task_files

from .helpers import assert_ok, launch

DEMO = str(repo_root() / "configs" / "experiments" / "demo.yaml")
TASKS = ["arc_easy", "hellaswag"]


def train_main(argv: list[str]) -> int:
    from megamor.train.__main__ import main

    return main(argv)


def test_an_unknown_task_is_one_line_naming_the_key_exit_2(capsys):
    assert train_main(["--config", DEMO, "data.train=[x]", "eval.tasks=[hellaswag,arc_easi]", "--print-config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config key 'eval.tasks[1]'" in err[0] and "did you mean arc_easy?" in err[0], err


def test_tasks_need_the_data_tokenizer_and_a_positive_limit(tiny_config):
    with pytest.raises(ConfigError, match=r"data\.tokenizer.*required when eval\.tasks"):
        load_experiment([tiny_config], ["eval.tasks=[arc_easy]"])
    with pytest.raises(ConfigError, match=r"eval\.task_limit"):
        load_experiment([tiny_config], ["eval.task_limit=0"])


def test_a_missing_task_dataset_names_the_file(tiny_config, tiny_data, tmp_path, monkeypatch):
    cfg = load_experiment([tiny_config], ["eval.tasks=[arc_easy]", f"data.tokenizer={tiny_data / 'tok'}"])
    monkeypatch.setenv("MEGAMOR_DATA_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match=rf"eval.tasks\[0\].*{tmp_path / 'arc' / 'ARC-Easy-Test.jsonl'} not found"):
        check_task_files(cfg)


def harness_numbers(model: torch.nn.Module, tok_path: Path, limit: int, tasks=TASKS) -> dict[str, float]:
    tok = load_tokenizer(tok_path)
    scorer = Scorer(model, pad_id=tok.eos_id)
    out = {}
    for name, r in evaluate(scorer, tok, tasks, limit=limit).items():
        out.update({f"eval/{name}/{m}": v for m, v in r.metrics.items() if not m.endswith("_stderr")})
    return out


def test_in_loop_numbers_equal_the_harness_and_the_model_goes_back_to_train_mode(tiny_config, tiny_data):
    """LAMBADA's perplexity is continuous: it catches a request encoded unlike the harness's
    (accuracies of an untrained model rarely move)."""
    tasks = [*TASKS, "lambada"]
    cfg = load_experiment([tiny_config], [f"eval.tasks=[{','.join(tasks)}]", "eval.task_limit=9",
                                          f"data.tokenizer={tiny_data / 'tok'}", "model.max_seq_len=256"])
    torch.manual_seed(0)
    model = MoRLM(cfg.model).train()
    seen = []
    got = DownstreamEval(cfg, model, torch.device("cpu"), 0, 1, print_fn=seen.append).run()
    assert model.training
    want = harness_numbers(model, tiny_data / "tok", 9, tasks)
    assert {k: v for k, v in got.items() if k in want} == pytest.approx(want, rel=1e-5)  # fp32 sums of other batches
    assert {k: got[k] for k in want if "/acc" in k} == {k: v for k, v in want.items() if "/acc" in k}
    assert set(want) >= {"eval/arc_easy/acc", "eval/arc_easy/acc_norm", "eval/hellaswag/acc", "eval/hellaswag/acc_norm",
                         "eval/lambada/perplexity"}
    assert got["eval/downstream_examples"] == 27 and len(seen) == 1 and "27 examples" in seen[0]


def test_each_rank_scores_a_disjoint_share(tiny_config, tiny_data):
    """Without a process group the sums are not reduced: the two shares' counts add up to the whole."""
    cfg = load_experiment([tiny_config], ["eval.tasks=[arc_easy]", "eval.task_limit=7",
                                          f"data.tokenizer={tiny_data / 'tok'}", "model.max_seq_len=256"])
    torch.manual_seed(0)
    model = MoRLM(cfg.model)
    whole = DownstreamEval(cfg, model, torch.device("cpu"), 0, 1, print_fn=lambda _: None)
    halves = [DownstreamEval(cfg, model, torch.device("cpu"), r, 2, print_fn=lambda _: None) for r in (0, 1)]
    correct = [e.run()["eval/arc_easy/acc"] * 7 for e in (whole, *halves)]
    assert [len(e._shares[0].docs) for e in halves] == [4, 3]
    assert math.isclose(correct[0], correct[1] + correct[2], abs_tol=1e-9)


OVERRIDES = ["trainer.max_steps=4", "eval.every_steps=2", "eval.max_batches=1", "model.max_seq_len=256",
             "trainer.activation_checkpointing=false"]


def offline(run_dir: Path, limit: int) -> dict[str, float]:
    from megamor.runs.load import load_model_and_meta

    model, _ = load_model_and_meta(run_dir)
    return harness_numbers(model, run_dir / "tokenizer", limit)


@pytest.mark.launch
@pytest.mark.parametrize("zero", [1, 3])
def test_a_2_rank_run_logs_the_harness_numbers_of_its_checkpoint(tiny_config, tiny_data, tmp_path, zero):
    """At the eval cadence, to metrics.jsonl and the console, 2 gloo ranks give the single-process
    harness's numbers on the saved checkpoint: the 11 examples are shared 6/5 and
    the sums all-reduced. ZeRO-3 scores a plain copy gathered per evaluation (on the engine's
    module the ranks' gathers differ with causal routing and hang; the launch timeout fails it)."""
    limit = 11
    run = launch(tiny_config, tmp_path / "run", [*OVERRIDES, f"eval.tasks=[{','.join(TASKS)}]", f"eval.task_limit={limit}",
                                                 f"data.tokenizer={tiny_data / 'tok'}", f"deepspeed.zero_stage={zero}"],
                 nproc=2, timeout=240)
    assert_ok(run)
    rows = [r for r in run.records() if "eval/arc_easy/acc" in r]
    assert [r["step"] for r in rows] == [2, 4]
    assert "downstream eval: 22 examples (arc_easy 11, hellaswag 11) in" in run.output and "over 2 rank(s)" in run.output
    assert "eval/hellaswag/acc_norm" in run.output  # the console line
    want = offline(run.run_dir, limit)
    assert {k: v for k, v in rows[-1].items() if k in want} == want


def _fill_rank(rank: int, world: int) -> None:
    """2 ZeRO-3 ranks: after a causal-routing forward on different inputs, released and filled,
    the plain copy holds the whole seeded weights and buffers; the engine's stay partitioned."""
    import dataclasses

    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from megamor.train.config import experiment_from_dict
    from megamor.train.downstream import drop_weights, fill_from_zero3, zero3_partitioned
    from megamor.train.engine import build_engine, plain_model
    from tests.model.helpers import tiny_config

    exp = experiment_from_dict({
        "model": dataclasses.asdict(tiny_config(router={"type": "expert_choice"}, sharing="middle_cycle",
                                                num_recursions=2)),
        "data": {"train": ["unused"], "seq_len": 16}, "batch": {"global_batch_size": 4, "micro_batch_size": 2},
        "trainer": {"max_steps": 1, "compile": "false"},
        "deepspeed": {"zero_stage": 3, "precision": "fp32",
                      "config": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}},
    })
    cpu = torch.device("cpu")
    built = build_engine(exp, cpu, world=world, rank=rank, seed=3)
    torch.manual_seed(3)
    ref = MoRLM(exp.model).state_dict()
    assert zero3_partitioned(built.model)
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        built.engine(x, causal_routing=True)
    plain = plain_model(exp, built.layout, cpu)
    built.engine.empty_partition_cache()
    fill_from_zero3(plain, built.model)
    got = plain.state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in built.model.parameters())
    assert not zero3_partitioned(plain)
    drop_weights(plain)
    assert all(p.numel() == 0 for p in plain.parameters())
    built.engine.destroy()


@pytest.mark.launch
def test_a_plain_copy_filled_from_zero3_holds_the_whole_weights():
    from megamor.testing.distributed import run_distributed

    run_distributed(_fill_rank, world_size=2)
