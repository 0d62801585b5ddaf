"""python -m megamor.train --config configs/experiments/X.yaml [key=value ...]

Runs as one plain process, under torchrun, under the deepspeed launcher, or under srun (one
task per process). The whole config is loaded and checked (unknown keys, batch sizes that do
not divide over the world size, data paths, tokenizer) before any process group starts.
Exit codes: see megamor/train/signals.py (0 done, 1 failed, 2 bad config, 75 stopped by a
signal after a complete checkpoint: rerun to resume).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from megamor.cli import ArgumentParser, report
from megamor.config import ConfigError
from megamor.train.signals import EXIT_CONFIG, EXIT_FAILED, StoppedInSetup, StopRequest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m megamor.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=[], help="experiment YAML (repeatable; later ones override)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. trainer.max_steps=100")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # first: an argument error answers before torch loads (_cuda_available)
    from megamor.env import thread_defaults
    from megamor.parallel.env import peek_local_world_size

    thread_defaults(local_processes=peek_local_world_size() or 1)  # before torch loads OpenMP
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _cuda_available() else "cuda")
    # Imported here, not at the top: `--help` and argument errors answer without loading
    # torch, DeepSpeed or the model (the same reason for the imports further down).
    from megamor.parallel.env import peek_world_size
    from megamor.train.config import load_experiment, to_yaml
    from megamor.train.preflight import preflight

    try:
        cfg = load_experiment(args.config, args.overrides)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        tokenizer = preflight(cfg, peek_world_size())  # every check possible before a process group
    except (ConfigError, FileNotFoundError) as e:
        report("megamor.train", e, "configuration error")
        return EXIT_CONFIG

    from megamor.parallel import dist as pdist
    from megamor.parallel.env import resolve_launch_env
    from megamor.parallel.orphan import exit_with_launcher
    from megamor.parallel.watchdog import Watchdog, open_store
    from megamor.train.runlock import RunLock, RunLockedError, RunLockLostError
    from megamor.train.signals import EXIT_PREEMPTED, write_exit_file

    # From here on every phase answers a stop signal (save + 75) and follows the launcher.
    stop = StopRequest().install()
    exit_with_launcher(resolve_launch_env(dict(os.environ)).launcher)
    from megamor.data.errors import DataStateError
    from megamor.runs.layout import CheckpointError, NoValidCheckpointError
    from megamor.runs.safe_load import UnsafeCheckpointError
    from megamor.runs.save_errors import CheckpointSaveError
    from megamor.train.callbacks.restart_guard import NoProgressError
    from megamor.train.trainer import NonFiniteLossError, Trainer

    env, device = pdist.init_distributed(verbose=cfg.trainer.verbose_deepspeed)
    lock = RunLock(cfg.run_path)
    limit = cfg.parallel.collective_timeout_s
    watchdog = Watchdog(env.rank, env.world_size, limit, open_store(env.master_addr, env.master_port, 10.0)
                        if env.world_size > 1 and limit > 0 else None)
    watchdog.on_fire += [lock.release, lambda: write_exit_file(EXIT_PREEMPTED)]  # the next attempt finds the folder free
    trainer = None
    try:
        refused = None
        if env.rank == 0:
            try:
                lock.acquire()
            except (RunLockedError, OSError) as e:  # every rank must hear of it, not only rank 0
                refused = str(e)
        refused = pdist.broadcast_object(refused)
        if refused:
            if env.rank == 0:
                print(f"megamor.train: {refused}", file=sys.stderr, flush=True)
            return EXIT_CONFIG
        trainer = Trainer(cfg, env, device, tokenizer, stop_request=stop, run_lock=lock, watchdog=watchdog)
        return trainer.setup().fit()
    except StoppedInSetup:  # a stop signal during set-up (a universal conversion): its line is printed
        return EXIT_PREEMPTED
    except RunLockLostError as e:  # another trainer writes this folder now: stop, write nothing more
        if env.rank == 0:
            print(f"megamor.train: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    except (NoValidCheckpointError, UnsafeCheckpointError) as e:  # the run folder is bad input: refuse
        if env.rank == 0 or isinstance(e, UnsafeCheckpointError):
            print(f"megamor.train: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    except DataStateError as e:  # the checkpoint's data order cannot continue on this data: bad input (every rank)
        if env.rank == 0:
            print(f"megamor.train: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    except (CheckpointSaveError, CheckpointError, NonFiniteLossError, NoProgressError) as e:  # every rank alike
        if env.rank == 0:
            print(f"megamor.train: {e}", file=sys.stderr, flush=True)
        write_exit_file(EXIT_FAILED)  # a job script must not requeue it
        return EXIT_FAILED
    except KeyboardInterrupt:  # a second SIGINT: the user abandons the save
        print(f"megamor.train: rank {env.rank}: interrupted twice, stopped without a checkpoint", file=sys.stderr, flush=True)
        _failed(watchdog)
        return EXIT_FAILED
    except Exception as e:  # noqa: BLE001  top-level handler: report the traceback, exit EXIT_FAILED, release the lock
        lost = watchdog.peer_lost(e)
        if lost:  # another rank ended mid-collective (it failed, its watchdog fired, or it died): follow it
            code, line = lost
            print(f"megamor.train: {line}", file=sys.stderr, flush=True)
            write_exit_file(code)
            return code
        print(f"megamor.train: rank {env.rank} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        _failed(watchdog)
        return EXIT_FAILED
    finally:
        watchdog.stop()
        lock.release()
        stop.uninstall()
        if trainer is not None:
            try:
                trainer.close()
            except Exception as e:  # noqa: BLE001  releasing memory must not hide the run's own exit code
                print(f"megamor.train: rank {env.rank}: releasing the engine failed: {e!r}", file=sys.stderr, flush=True)
        pdist.shutdown()


def _failed(watchdog) -> None:
    """This rank alone ends on an error. Before its exit (the `finally`) closes the other ranks'
    connections: the store tells them (they fail too, not 75), and the exit file says 1, which
    no later 75 on this node replaces (slurm/train.sbatch must not requeue a failure)."""
    from megamor.train.signals import write_exit_file

    watchdog.record_failure()
    write_exit_file(EXIT_FAILED)


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001  probing CUDA must never stop the trainer: treat as no GPU
        return False


if __name__ == "__main__":
    code = main()  # an argument error exits in here, before anything heavy loads
    from megamor.parallel.dist import exit_without_finalizing  # lazy, as the imports in main()

    exit_without_finalizing(code)
