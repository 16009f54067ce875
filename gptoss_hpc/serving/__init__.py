"""The parts of ``gptoss_hpc.serve``: API key handling and request guards (``auth``), request/response
schemas (``schemas``), the one-thread bounded generation queue (``worker``), the OpenAI-compatible
routes (``openai_api``) and the Slurm job body (``job``). The app is assembled in ``gptoss_hpc.serve``."""
