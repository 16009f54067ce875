"""The HTTP layer of the serve stage (``gptoss_hpc.stages.serve``): the FastAPI app and uvicorn (``app``), API
key handling and request guards (``auth``), request/response schemas (``schemas``), the one-thread bounded
generation queue (``worker``), the OpenAI-compatible routes (``openai_api``) and the Slurm job body (``job``)."""
