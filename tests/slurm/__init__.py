"""Local SLURM cluster scripts and pytest helpers (see cluster.py)."""
