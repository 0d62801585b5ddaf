#!/usr/bin/env python
"""lm-eval's command line with the `megamor` model registered (lm-eval has no plugin discovery).

    python evals/lm_eval_megamor.py --model megamor \
        --model_args checkpoint=runs/mor/,tokenizer=tok.model,dtype=bf16 --batch_size 32 \
        --include_path evals/tasks --tasks megamor_hellaswag,megamor_piqa --num_fewshot 0

Every lm-eval option works as usual. The local task YAMLs (evals/tasks/megamor_*.yaml) read
the datasets from $MEGAMOR_DATA_DIR; `--metadata '{"data_dir": "/path"}'` overrides it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megamor.cli import BadInput, one_line_errors_everywhere, run_main, tool_name
from megamor.data.tokenizer import TokenizerMismatchError
from megamor.eval.errors import EvalInputError


def cli_evaluate() -> None:
    """lm_eval.__main__.cli_evaluate with the `megamor` model registered after the arguments
    are parsed: lm-eval's parser needs no torch, so --help and bad arguments answer at once."""
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    setup_logging()
    parser = HarnessCLI()
    args = parser.parse_args()
    import megamor.eval.lm_eval_adapter  # noqa: F401 - registers "megamor" (loads torch)

    try:
        parser.execute(args)
    except ValueError as e:  # lm-eval's own bad input (an unknown task name): one line, exit 2
        if str(e).startswith("Tasks not found"):
            raise BadInput(f"--tasks: {e} (local tasks need --include_path evals/tasks)") from None
        raise


if __name__ == "__main__":
    one_line_errors_everywhere(tool_name())  # lm-eval builds its own argparse parser
    # A tokenizer mismatch or a continuation longer than the context: one line, exit 2. lm-eval
    # prints its own results table on stdout, so stdout is left as it is.
    run_main(cli_evaluate, bad_input=(EvalInputError, TokenizerMismatchError), results_on_stdout=False)
