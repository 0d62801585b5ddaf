"""The study file: variants x seeds trained at one FLOP (or token) budget, then evaluated.

    name: small_cpu
    experiment: configs/experiments/demo.yaml     # base experiment of every run
    overrides: [batch.global_batch_size=16]       # applied to every run
    budget: {flops: 1.0e15, count: forward}       # or {tokens: 5000000}
    flops: {convention: paper}                    # how FLOPs become tokens (default exact)
    seeds: [1, 2]
    data: {text: [${oc.env:MEGAMOR_DATA_DIR}/gutenberg], vocab_size: 4096}
    variants:
      - {name: vanilla, model_config: configs/model/33m/vanilla.yaml, overrides: [model.d_model=128]}
    eval: {fewshot_tasks: [piqa, arc_easy], fewshot_limit: 100}

Several budgets (a scaling study) instead of `budget`: each with its own experiment overrides
(a wider model at a bigger budget) and optionally a subset of the variants; runs go to
OUT/runs/<budget>/<variant>-s<seed>, named <variant>@<budget>-s<seed>:

    budgets:
      - {name: 1x, flops: 8.0e12}
      - {name: 3x, flops: 2.4e13, overrides: [model.d_model=256], variants: [vanilla, mor]}
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from megamor.config import ConfigError, key, load_config
from megamor.model.flops import BUDGET_COUNTS, FlopsConfig

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class BudgetConfig:
    flops: float | None = None  # per run; each variant's tokens = flops / FLOPs per token
    tokens: int | None = None  # or the same tokens for every variant (iso-data)
    # forward: FLOPs of the forward pass (the paper's 16.5e18 at 360M is forward FLOPs x ~20B
    # tokens); training: 3 x forward.
    count: str = "forward"

    @property
    def is_set(self) -> bool:
        return self.flops is not None or self.tokens is not None

    def validate(self, path: str) -> None:  # unset (neither) is allowed here: a study may give `budgets`
        if self.flops is not None and self.tokens is not None:
            raise ConfigError(key(path, "flops"), "give exactly one of budget.flops and budget.tokens")
        if self.flops is not None and not self.flops > 0:
            raise ConfigError(key(path, "flops"), f"must be positive, got {self.flops}")
        if self.tokens is not None and self.tokens < 1:
            raise ConfigError(key(path, "tokens"), f"must be >= 1, got {self.tokens}")
        if self.count not in BUDGET_COUNTS:
            raise ConfigError(key(path, "count"), f"must be one of {BUDGET_COUNTS}, got {self.count!r}")


StudyFlopsConfig = FlopsConfig  # the study's `flops:` (the name kept for imports)


@dataclass
class StudyBudgetConfig(BudgetConfig):
    """One budget of a scaling study (`budgets:`)."""

    name: str = ""  # the run folder OUT/runs/<name>/ and the run names' @<name>
    overrides: list[str] = field(default_factory=list)  # experiment keys of this budget's runs (its width)
    variants: list[str] | None = None  # the variants trained at this budget (default: every one)

    def validate(self, path: str) -> None:
        if not _NAME.match(self.name or ""):
            raise ConfigError(key(path, "name"), f"must be a plain name (letters, digits, _ . -), got {self.name!r}")
        if not self.is_set:
            raise ConfigError(key(path, "flops"), "give exactly one of flops and tokens")
        super().validate(path)
        for o in self.overrides:
            if "=" not in o:
                raise ConfigError(key(path, "overrides"), f"{o!r} must look like key=value")


@dataclass
class VariantConfig:
    name: str = ""  # the variant's name in run names and reports
    model_config: str = ""  # a configs/model/*.yaml (optional with `experiment`: its own model_config)
    overrides: list[str] = field(default_factory=list)  # experiment keys, e.g. model.router.alpha=1.0
    # this variant's base experiment instead of the study's (the paper's per-variant recipes in
    # configs/experiments/paper/, say); the study's budget still sets its length
    experiment: str | None = None

    def validate(self, path: str) -> None:
        if not _NAME.match(self.name or ""):
            raise ConfigError(key(path, "name"), f"must be a plain name (letters, digits, _ . -), got {self.name!r}")
        if not self.model_config and not self.experiment:
            raise ConfigError(key(path, "model_config"), "is required (or an `experiment` that names one)")
        for o in self.overrides:
            if "=" not in o:
                raise ConfigError(key(path, "overrides"), f"{o!r} must look like key=value")


TOKENIZER_KINDS = ("sentencepiece", "hf-bpe")  # data_prep/train_tokenizer.py --kind


@dataclass
class StudyDataConfig:
    # Raw text (files or folders: .txt/.jsonl/.parquet; other extensions are read as .txt),
    # prepared once into OUT/data/{tokenizer,shards}. Or give ready `shards` (+ `tokenizer`).
    text: list[str] = field(default_factory=list)
    vocab_size: int = 4096  # the tokenizer trained on `text`
    tokenizer_kind: str = "sentencepiece"  # the tokenizer trained on `text`: sentencepiece | hf-bpe (byte-level BPE)
    valid_fraction: float = 0.02  # documents held out for validation
    txt_mode: str = "paragraph"  # a .txt document: file | paragraph | line
    shards: str | None = None  # prepared shards to use instead of `text`
    tokenizer: str | None = None  # the tokenizer of `shards`

    def validate(self, path: str) -> None:
        if not self.text and not self.shards:
            raise ConfigError(key(path, "text"), "give raw text files (data.text) or prepared shards (data.shards)")
        if self.shards and not self.tokenizer:
            raise ConfigError(key(path, "tokenizer"), "prepared shards need their tokenizer")
        if not 0.0 < self.valid_fraction < 1.0:
            raise ConfigError(key(path, "valid_fraction"), f"must be in (0, 1), got {self.valid_fraction}")
        if self.tokenizer_kind not in TOKENIZER_KINDS:
            raise ConfigError(key(path, "tokenizer_kind"), f"must be one of {TOKENIZER_KINDS}, got {self.tokenizer_kind!r}")


@dataclass
class StudyEvalConfig:
    val_max_batches: int = 20  # validation windows: the first val_max_batches x val_batch_size
    val_batch_size: int = 8  # sequences per validation batch
    fewshot_tasks: list[str] = field(default_factory=list)  # megamor.eval task names
    fewshot_limit: int | None = 100  # examples per task
    num_fewshot: int = 0  # examples in each few-shot prompt
    fewshot_data_dir: str | None = None  # default $MEGAMOR_DATA_DIR
    depth_plots: bool = True  # per run: depth histogram, depth vs loss (validation tokens)

    def validate(self, path: str) -> None:
        if self.val_max_batches < 1 or self.val_batch_size < 1:
            raise ConfigError(key(path, "val_max_batches"), "val_max_batches and val_batch_size must be >= 1")
        if self.fewshot_limit is not None and self.fewshot_limit < 1:
            raise ConfigError(key(path, "fewshot_limit"), "must be >= 1 (or null for every example)")
        from megamor.eval.tasks import SUITES, UnknownTaskError, check_task_names  # light: no torch

        try:  # before any run trains (an unknown name used to fail only at evaluation, after training)
            check_task_names([t for t in self.fewshot_tasks if t not in SUITES], key(path, "fewshot_tasks"))
        except UnknownTaskError as e:
            raise ConfigError(key(path, "fewshot_tasks"), str(e.args[0]).split(": ", 1)[-1]) from None


@dataclass
class StudyConfig:
    name: str = ""  # the study's name: runs/studies/<name> unless out_dir is set
    experiment: str = ""  # base experiment YAML of every run (a variant may name its own)
    overrides: list[str] = field(default_factory=list)  # experiment keys for every run
    out_dir: str | None = None  # default runs/studies/<name>
    report_dir: str | None = None  # table + plots; default out_dir
    # the variant the report's paired table compares every other one with, seed by seed
    # (default: the first variant); the pairing cancels what a seed does to every variant alike
    reference: str | None = None
    seeds: list[int] = field(default_factory=lambda: [1234])  # every variant trains once per seed
    nproc: int = 1  # processes per run (torchrun when > 1)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    budgets: list[StudyBudgetConfig] = field(default_factory=list)  # several budgets instead of `budget`
    flops: FlopsConfig = field(default_factory=FlopsConfig)
    data: StudyDataConfig = field(default_factory=StudyDataConfig)
    variants: list[VariantConfig] = field(default_factory=list)  # the models compared (see variants[] below)
    eval: StudyEvalConfig = field(default_factory=StudyEvalConfig)

    def validate(self, path: str = "") -> None:
        if not _NAME.match(self.name or ""):
            raise ConfigError(key(path, "name"), f"must be a plain name (letters, digits, _ . -), got {self.name!r}")
        if not self.experiment:
            raise ConfigError(key(path, "experiment"), "is required (the base experiment YAML of every run)")
        if not self.variants:
            raise ConfigError(key(path, "variants"), "list at least one variant")
        for i, v in enumerate(self.variants):  # list items are not reached by validate_tree
            v.validate(key(path, f"variants[{i}]"))
        names = [v.name for v in self.variants]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(key(path, "variants"), f"duplicate variant names: {dup}")
        if self.reference is not None and self.reference not in names:
            raise ConfigError(key(path, "reference"), f"{self.reference!r} is not a variant; variants: {names}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(key(path, "seeds"), f"must be distinct and non-empty, got {list(self.seeds)}")
        if self.nproc < 1:
            raise ConfigError(key(path, "nproc"), "must be >= 1")
        self._validate_budgets(path, names)

    def _validate_budgets(self, path: str, variants: list[str]) -> None:
        if not self.budgets:
            if not self.budget.is_set:
                raise ConfigError(key(path, "budget.flops"), "give exactly one of budget.flops and budget.tokens "
                                                             "(or a `budgets` list)")
            return
        if self.budget.is_set:
            raise ConfigError(key(path, "budgets"), "give either `budget` (one) or `budgets` (several), not both")
        for i, b in enumerate(self.budgets):
            p = key(path, f"budgets[{i}]")
            b.validate(p)
            unknown = [v for v in b.variants or [] if v not in variants]
            if unknown or b.variants == []:
                raise ConfigError(key(p, "variants"), f"{unknown or '[]'}: list variants of the study; variants: {variants}")
        names = [b.name for b in self.budgets]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(key(path, "budgets"), f"duplicate budget names: {dup}")
        counts = sorted({b.count for b in self.budgets})
        if len(counts) > 1:
            raise ConfigError(key(path, "budgets"), f"every budget must count FLOPs the same way, got {counts}")
        if self.reference is not None and any(b.variants and self.reference not in b.variants for b in self.budgets):
            missing = [b.name for b in self.budgets if b.variants and self.reference not in b.variants]
            raise ConfigError(key(path, "reference"), f"{self.reference!r} is not trained at budgets {missing}")

    def run_budgets(self) -> list[StudyBudgetConfig]:
        """The budgets in run order; a single-budget study's one budget has the name "" (its
        runs keep the OUT/runs/<variant>-s<seed> layout)."""
        if self.budgets:
            return list(self.budgets)
        b = self.budget
        return [StudyBudgetConfig(flops=b.flops, tokens=b.tokens, count=b.count)]

    def budget_variants(self, budget: StudyBudgetConfig) -> list[VariantConfig]:
        return [v for v in self.variants if budget.variants is None or v.name in budget.variants]

    @property
    def count(self) -> str:
        return self.run_budgets()[0].count

    @property
    def flops_label(self) -> str:
        """How the study's FLOPs are counted, for its report: e.g. 'forward, paper convention'."""
        return f"{self.count}, {self.flops.convention} convention"

    @property
    def out_path(self) -> Path:
        return Path(self.out_dir) if self.out_dir else Path("runs") / "studies" / self.name

    @property
    def report_path(self) -> Path:
        return Path(self.report_dir) if self.report_dir else self.out_path


def load_study(path: str | Path, overrides: list[str] | None = None) -> StudyConfig:
    return load_config(StudyConfig, path, overrides=overrides or [])
