"""Read what W&B logged offline (megamor.train.wandb_offline), for the tests' checks."""

from megamor.train.wandb_offline import exit_code, history, iter_payloads, run_id

__all__ = ["exit_code", "history", "iter_payloads", "run_id"]
