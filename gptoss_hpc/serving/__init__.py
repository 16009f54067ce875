"""The HTTP layer of the serve stage (``gptoss_hpc.stages.serve``): the FastAPI app and uvicorn (``app``), API
key handling and request guards (``auth``), request/response schemas (``schemas``), the one-thread bounded
generation queue (``worker``), and the OpenAI-compatible routes
(``openai_api``). The Slurm job body is the stage's: ``gptoss_hpc.stages.serve_job``."""
