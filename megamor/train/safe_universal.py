"""python -m megamor.train.safe_universal --input_folder TAG --output_folder OUT [...]

DeepSpeed's ds_to_universal (same arguments) run with every torch.load weights-only (see
megamor.train.safe_load): converting a checkpoint must not execute code planted in it. Run as
a subprocess by megamor.train.checkpoint.ensure_universal; exit 2 when a file is refused.
"""

from __future__ import annotations

import os
import sys

from megamor.train.safe_load import FORCE_ENV, UnsafeCheckpointError, safe_torch_load


def main() -> int:
    os.environ[FORCE_ENV] = "1"  # belt and braces: torch itself refuses weights_only=False loads
    from deepspeed.checkpoint import ds_to_universal

    args = ds_to_universal.parse_arguments()
    if args.num_extract_workers > 1 or args.num_merge_workers > 1:
        print("megamor.train.safe_universal: worker pools would load outside the safe loader; use 1 worker",
              file=sys.stderr)
        return 2
    try:
        with safe_torch_load():
            ds_to_universal.main(args)
    except UnsafeCheckpointError as e:
        print(f"megamor.train.safe_universal: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
