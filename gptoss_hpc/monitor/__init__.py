"""Watching a launch: ``state`` reads run directories and Slurm state (the one reader used by status, logs,
cancel and the report stage); ``status``, ``logs`` and ``cancel`` are the CLIs on top of it."""
