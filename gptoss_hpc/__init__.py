"""gptoss_hpc: LoRA fine-tuning of OpenAI gpt-oss on Slurm (Hydra + submitit + TRL + PEFT + DeepSpeed)."""

__version__ = "0.1.0"
