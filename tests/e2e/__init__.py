"""End-to-end tests: torchrun jobs, Slurm jobs, real servers."""
