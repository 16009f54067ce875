"""The parts of ``gptoss_hpc.serve``: API key handling and request guards (``auth``), request/response
schemas (``schemas``), the one-thread bounded generation queue (``worker``) and the OpenAI-compatible
routes (``openai_api``). The app itself is assembled in ``gptoss_hpc.serve``."""
