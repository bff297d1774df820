"""Data-parallel training over several GPUs and nodes (`train.distributed` in the study file).

`launch`: the launcher command lines `tunelab train` starts for a distributed run (torchrun on each node, srun
across SLURM nodes) and the signal forwarding around them. `runtime`: what each training process does
differently from a single one (its share of a step's micro-batches, the token count summed over ranks,
gradient all-reduce through DDP or DeepSpeed ZeRO, rank 0 writing). `zero`: the DeepSpeed config generated
from the run's settings.
"""
