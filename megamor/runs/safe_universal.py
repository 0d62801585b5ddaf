"""python -m megamor.runs.safe_universal --input_folder TAG --output_folder OUT [...]

DeepSpeed's ds_to_universal (same arguments) run with every torch.load weights-only (see
megamor.runs.safe_load): converting a checkpoint must not execute code planted in it. Run as
a subprocess by megamor.runs.resume.ensure_universal; exit 2 when a file is refused.
"""

from __future__ import annotations

import os
import sys

from megamor.cli import one_line_errors_everywhere
from megamor.runs.safe_load import FORCE_ENV, UnsafeCheckpointError, safe_torch_load

PROG = "megamor.runs.safe_universal"


def main() -> int:
    os.environ[FORCE_ENV] = "1"  # belt and braces: torch itself refuses weights_only=False loads
    one_line_errors_everywhere(PROG)  # DeepSpeed's own parser: one line, exit 2
    from deepspeed.checkpoint import ds_to_universal

    args = ds_to_universal.parse_arguments()
    if args.num_extract_workers > 1 or args.num_merge_workers > 1:
        print(f"{PROG}: worker pools would load outside the safe loader; use 1 worker",
              file=sys.stderr)
        return 2
    try:
        with safe_torch_load():
            ds_to_universal.main(args)
    except UnsafeCheckpointError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
