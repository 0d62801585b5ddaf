"""Distributed plumbing applied from outside the model.

    env.py              launcher variables (torchrun, deepspeed, srun, plain) -> RANK/WORLD_SIZE/...
    dist.py             process-group start/stop and the small collectives the trainer uses
    launch.py           torchrun / deepspeed launcher commands, hostfiles from SLURM
    mpu.py              tensor x data parallel groups in the shape DeepSpeed's `mpu` expects
    tensor_parallel.py  Megatron-style column/row-parallel layers applied to a built model
"""
