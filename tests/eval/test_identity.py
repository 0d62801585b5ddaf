"""Every evaluation entry point checks the tokenizer and the shards against the tokenizer the
checkpoint was trained with, by training's own check (megamor.data.tokenizer.check_same_tokenizer):
a mismatch is one line, exit 2; --allow-tokenizer-mismatch evaluates anyway (issue 27)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from megamor.data.tokenizer import TokenizerMismatchError, file_sha256
from megamor.eval.cli import run_main

from .test_checkpoint import training_run
from .test_cli import load

QUIET = {"progress": False, "log": lambda m: None}


@pytest.fixture(scope="module")
def other_tok(shared_data, tmp_path_factory) -> Path:
    """Another real tokenizer (megamor's trainer, other vocabulary) that fits the model's vocabulary."""
    from megamor.data.tokenizer_train import train_tokenizer

    out = tmp_path_factory.mktemp("other_tok")
    return train_tokenizer([str(shared_data / "tinyshakespeare" / "input.txt")], out, vocab_size=800, num_threads=1).path


@pytest.fixture(scope="module")
def run(mor_model, spm_path, tmp_path_factory) -> Path:
    """A run folder whose tag records (trainer_state.pt) the tokenizer it was trained with, spm_path,
    with the copy of it the trainer keeps in run/tokenizer/."""
    run = training_run(tmp_path_factory.mktemp("recorded"), mor_model, spm_path, steps=(100,),
                       tokenizer_hash=file_sha256(spm_path))
    (run / "tokenizer").mkdir()
    (run / "tokenizer" / "tokenizer.model").write_bytes(spm_path.read_bytes())
    return run


def make_shards(tokenizer: Path, out: Path) -> Path:
    from megamor.data.pipeline import ShardSettings, tokenize_and_shard

    src = out.parent / f"{out.name}.jsonl"
    src.write_text(json.dumps({"text": "Some words to score, and a few more words. " * 40}) + "\n")
    tokenize_and_shard([str(src)], out, tokenizer, ShardSettings(valid_fraction=0.0), **QUIET)
    return out


@pytest.fixture(scope="module")
def own_shards(spm_path, tmp_path_factory) -> Path:
    return make_shards(spm_path, tmp_path_factory.mktemp("own") / "shards")


@pytest.fixture(scope="module")
def other_shards(other_tok, tmp_path_factory) -> Path:
    return make_shards(other_tok, tmp_path_factory.mktemp("other") / "shards")


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "book.txt"
    p.write_text("It was the best of times, it was the worst of times. " * 8)
    return p


def mismatch(actual: Path, run: Path, spm_path: Path, flag: str = "--allow-tokenizer-mismatch") -> str:
    """The expected message: both files' hashes and the flag that allows it."""
    return (rf"tokenizer {re.escape(str(actual))} \(hash {file_sha256(actual)[:12]}\) is not the tokenizer {re.escape(str(run))}\S* was trained with "
            rf"\(hash {file_sha256(spm_path)[:12]}\).*{flag}")


def one_error_line(capsys, main) -> str:
    """run_main (what every evals/ script's __main__ calls): exit 2 and exactly one `error:` line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(main)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(r"\S+: error: ", err[0]), err  # `TOOL: error: ...` (megamor.cli)
    return err[0]


def test_perplexity_checks_tokenizer_and_shards(run, spm_path, other_tok, own_shards, other_shards, text, capsys):
    ppl = load("perplexity")
    base = ["--checkpoint", str(run), "--no-progress"]
    # The run's own tokenizer (found through its experiment.yaml) and its own shards: evaluated, and said so.
    out = ppl.main([*base, "--text", str(text)])
    assert out["meta"]["tokenizer_check"] == "same as the checkpoint's"
    out = ppl.main([*base, "--shards", str(own_shards), "--shard-split", "train"])
    assert out["meta"]["tokenizer_check"] == "same as the checkpoint's" and out["perplexity"]["tokens"] > 0
    # The two commands: another tokenizer, foreign shards.
    bad_tok = [*base, "--tokenizer", str(other_tok), "--text", str(text)]
    with pytest.raises(TokenizerMismatchError, match=mismatch(other_tok, run, spm_path)):
        ppl.main(bad_tok)
    line = one_error_line(capsys, lambda: ppl.main(bad_tok))
    assert "--allow-tokenizer-mismatch" in line
    bad_shards = [*base, "--shards", str(other_shards), "--shard-split", "train"]
    with pytest.raises(TokenizerMismatchError, match=rf"the tokenizer of the shards in {other_shards} \(hash "
                                                     rf"{file_sha256(other_tok)[:12]}\) is not the tokenizer {run}"):
        ppl.main(bad_shards)
    one_error_line(capsys, lambda: ppl.main(bad_shards))
    # Deliberate: evaluated, with a warning on stderr and the mismatch kept in the results.
    capsys.readouterr()
    out = ppl.main([*bad_tok, "--allow-tokenizer-mismatch"])
    assert out["meta"]["tokenizer_check"].startswith("mismatch allowed: tokenizer ")
    assert out["meta"]["trained_tokenizer_hash"] == file_sha256(spm_path) != out["meta"]["tokenizer_hash"]
    assert "warning: tokenizer" in capsys.readouterr().err


def test_fewshot_and_depth_check_the_tokenizer(run, spm_path, other_tok, data_dir, capsys):
    few = ["--checkpoint", str(run), "--tokenizer", str(other_tok), "--tasks", "arc_easy", "--limit", "2",
           "--data-dir", str(data_dir), "--no-progress"]
    with pytest.raises(TokenizerMismatchError, match=mismatch(other_tok, run, spm_path)):
        load("fewshot").main(few)
    one_error_line(capsys, lambda: load("fewshot").main(few))
    assert load("fewshot").main([*few, "--allow-tokenizer-mismatch"])["results"]["arc_easy"]["n"] == 2
    depth = ["--checkpoint", str(run), "--tokenizer", str(other_tok), "--text", "The cat sat.", "--quiet"]
    with pytest.raises(TokenizerMismatchError, match=mismatch(other_tok, run, spm_path)):
        load("depth").main(depth)
    one_error_line(capsys, lambda: load("depth").main(depth))
    load("depth").main([*depth, "--allow-tokenizer-mismatch"])
    load("depth").main(["--checkpoint", str(run), "--tokenizer", str(spm_path), "--text", "The cat sat.", "--quiet"])


def test_sweep_checks_the_tokenizer(run, spm_path, other_tok, data_dir, tmp_path, capsys):
    args = [str(run), "--out", str(tmp_path / "s"), "--tasks", "arc_easy", "--limit", "2", "--data-dir", str(data_dir),
            "--tokenizer", str(other_tok), "--no-plots", "--no-progress"]
    sweep = load("sweep")
    with pytest.raises(TokenizerMismatchError, match=mismatch(other_tok, run, spm_path)):
        sweep.main(args)
    one_error_line(capsys, lambda: sweep.main(args))
    assert not list((tmp_path / "s").rglob("*.json"))  # nothing cached
    assert sweep.main([*args, "--allow-tokenizer-mismatch"])["computed"] == 1


def test_lm_eval_adapter_checks_the_tokenizer(run, spm_path, other_tok):
    from megamor.eval.lm_eval_adapter import MegamorLM

    flag = r"allow_tokenizer_mismatch=true in --model_args"
    with pytest.raises(TokenizerMismatchError, match=mismatch(other_tok, run, spm_path, flag)):
        MegamorLM(checkpoint=str(run), tokenizer=str(other_tok))
    lm = MegamorLM(checkpoint=str(run), tokenizer=str(other_tok), allow_tokenizer_mismatch="true")
    assert lm.identity["tokenizer_check"].startswith("mismatch allowed")
    assert MegamorLM(checkpoint=str(run)).identity["tokenizer_check"] == "same as the checkpoint's"


def test_study_evaluation_checks_tokenizer_and_shards(mor_model, run, spm_path, other_tok, own_shards, other_shards):
    from megamor.config import ConfigError
    from megamor.study.config import StudyEvalConfig
    from megamor.study.evaluate import check_run_identity, validation
    from megamor.train.config import ExperimentConfig

    exp = ExperimentConfig(name="exp1", run_dir=str(run), model=mor_model.cfg)
    exp.data.seq_len = 64
    exp.data.train, exp.data.valid, exp.data.valid_split = [str(own_shards)], [str(own_shards)], "train"
    exp.data.tokenizer = str(spm_path)
    check_run_identity(exp)
    res, _ = validation(mor_model, exp, StudyEvalConfig(val_max_batches=1))
    assert res["val_tokens"] > 0
    exp.data.tokenizer = str(other_tok)
    with pytest.raises(ConfigError, match=f"config key 'data': tokenizer {other_tok} .* is not the tokenizer {run} was trained with"):
        validation(mor_model, exp, StudyEvalConfig(val_max_batches=1))
    exp.data.tokenizer, exp.data.valid = str(spm_path), [str(other_shards)]
    with pytest.raises(ConfigError, match=f"the tokenizer of the shards in {other_shards} .* is not the tokenizer {run} was"):
        check_run_identity(exp)


def test_export_records_and_checks_the_tokenizer(mor_model, spm_path, other_tok, tmp_path, text):
    from megamor.export import export, main

    out = export(training_run(tmp_path / "a", mor_model, spm_path, steps=(100,), tokenizer_hash=file_sha256(spm_path)))
    assert json.loads((out / "megamor.pt.json").read_text())["tokenizer_hash"] == file_sha256(spm_path)
    assert file_sha256(out / "tokenizer.model") == file_sha256(spm_path)
    with pytest.raises(TokenizerMismatchError, match=mismatch(other_tok, out, spm_path)):  # evaluating the export
        load("perplexity").main(["--checkpoint", str(out), "--tokenizer", str(other_tok), "--text", str(text), "--no-progress"])
    # A run whose config now names another tokenizer than the one its checkpoint recorded: not exported.
    run_b = training_run(tmp_path / "b", mor_model, other_tok, steps=(100,), tokenizer_hash=file_sha256(spm_path))
    with pytest.raises(TokenizerMismatchError, match=f"tokenizer {other_tok} .* is not the tokenizer"):
        export(run_b)
    assert main([str(run_b)]) == 2 and not (run_b / "export").exists()


def test_lm_eval_command_line_mismatch_is_one_line(run, spm_path, other_tok, data_dir):
    """The real wrapper script (lm-eval's CLI inside run_main): one `error:` line on stderr, exit 2."""
    from .test_cli import run_entry

    r = run_entry("lm_eval_megamor", "--model", "megamor", "--model_args", f"checkpoint={run},tokenizer={other_tok}",
                  "--include_path", str(Path(__file__).parents[2] / "evals" / "tasks"), "--tasks", "megamor_piqa",
                  "--limit", "2", "--metadata", json.dumps({"data_dir": str(data_dir)}))
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("lm_eval_megamor.py: error: ")]
    assert len(errors) == 1 and re.search(mismatch(other_tok, run, spm_path, "allow_tokenizer_mismatch=true in --model_args"), errors[0])
    assert "Traceback" not in r.stderr
