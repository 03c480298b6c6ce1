"""Ray Train recipe: ``trainval fit`` inside every worker of ``ray.train.torch.TorchTrainer``.

    python examples/ray_train.py examples/digits.yaml run.out_dir=/shared/runs train.epochs=5 \\
        --workers 2 --storage /shared/ray_results

Ray starts the workers (one per process slot: ``--workers``; ``--gpus`` gives each a GPU), sets the variables
torchrun would (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) and joins them in a
process group (gloo on CPUs, NCCL on GPUs) before it calls :func:`train_worker`. trainval sees that group and
those variables and runs as it does under torchrun: each worker trains its share of every batch (DDP, or
``train.strategy=fsdp``), rank 0 writes the run folder. The run folder (``run.out_dir``) and Ray's
``--storage`` must be on storage every node sees (NFS, a shared disk): rank 0 writes best.pt/last.pt there
and a resumed run (``--resume``) reads them back. With ``--address`` the script joins a running Ray cluster
(``ray start --head`` ...); without it, it starts a local one with ``--workers`` x ``--cpus-per-worker`` CPUs
and no dashboard, and shuts it down at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def train_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: the same config -> ``trainval.app.workflow.fit`` as ``trainval fit``."""
    import ray.train

    from trainval.app import config, workflow

    cfg = config.load(loop_config["config"], loop_config["overrides"])
    summary = workflow.fit(cfg, resume=loop_config["resume"])
    # every worker reports (Ray Train waits for all); the values that matter are rank 0's
    ray.train.report({k: v for k, v in summary.items() if isinstance(v, (int, float, str)) or v is None})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("args", nargs="*", metavar="CONFIG [key=value]", help="as `trainval fit`")
    parser.add_argument("--workers", type=int, default=2, help="training processes (default 2)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--gpus", action="store_true", help="one GPU per worker (NCCL)")
    parser.add_argument("--storage", required=True, help="Ray's results folder: shared by every node")
    parser.add_argument("--name", default="trainval", help="the Ray run's name (a folder under --storage)")
    parser.add_argument(
        "--address", default=None, help="a running Ray cluster (e.g. 'auto'); default: a local one"
    )
    parser.add_argument("--resume", action="store_true", help="continue the run folder's last.pt")
    args = parser.parse_args(argv)
    config_path = args.args[0] if args.args and "=" not in args.args[0] else None
    overrides = args.args[1:] if config_path is not None else args.args

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from trainval.app import config, workflow

    cfg = config.load(config_path, overrides)  # a config error is one line here, before any worker starts
    if args.address is not None:
        ray.init(address=args.address)
    else:  # "local": a cluster of our own, never one that `ray start` left running on this machine
        cpus = max(1, round(args.workers * args.cpus_per_worker))
        ray.init(address="local", num_cpus=cpus, include_dashboard=False)
    try:
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"config": config_path, "overrides": overrides, "resume": args.resume},
            scaling_config=ScalingConfig(
                num_workers=args.workers,
                use_gpu=args.gpus,
                resources_per_worker={"CPU": args.cpus_per_worker, **({"GPU": 1} if args.gpus else {})},
            ),
            run_config=RunConfig(name=args.name, storage_path=os.path.abspath(args.storage)),
        )
        result = trainer.fit()  # a worker's error raises here (ray.train.TrainingFailedError)
        print(f"ray train finished: run folder {workflow.run_folder(cfg)}; Ray's results {result.path}")
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
