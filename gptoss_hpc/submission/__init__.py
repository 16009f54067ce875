"""Submission: config -> sbatch parameters (sbatch.py), the stage DAG (pipeline.py), the launch manifest."""
