"""Process launchers above the training loops: Slurm (srun + torchrun, engine nodes)."""
