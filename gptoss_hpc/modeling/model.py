"""The base model: gpt-oss from the Hub / a local path, or the tiny seeded gpt-oss for CPU runs.

The tiny model is built once per point from ``gptoss_hpc/resources/<tiny_config>.json`` (vocab sized to the
tokenizer, weights seeded with ``train.seed``), saved to ``paths.base`` and loaded from there afterwards, so
the train, merge and eval stages see the same base. Every rank can build it (same seed, same weights); only
rank 0 writes it, through a temp dir and a rename.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptoss_hpc.config.derive import mxfp4_resident
from gptoss_hpc.config.schema import RunConfig
from gptoss_hpc.errors import GptossHpcError, ResourceNotReachableError
from gptoss_hpc.modeling.hub import check_hub_repo, is_local, unreachable
from gptoss_hpc.paths import PointPaths

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

_MODEL_FIX = (
    "export HF_TOKEN for gated/private repos, or download it (`hf download {name}`) and set "
    "model.name_or_path=<local dir>, or use model=tiny_gpt_oss for a CPU run"
)


def base_dir_for(cfg: RunConfig, paths: PointPaths | None) -> str:
    """Where the base weights live: the point's base/ for the tiny model, else model.name_or_path."""
    if cfg.model.tiny:
        if paths is None:
            raise GptossHpcError("the tiny model lives in a point's base/ folder: pass its PointPaths")
        return str(paths.base)
    return cfg.model.name_or_path


def torch_dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def load_kwargs(cfg: RunConfig, *, for_generation: bool = False) -> dict[str, Any]:
    """dtype, attention and experts kernels: what every loader (train, merge, eval, serve, the bench) passes to
    ``from_pretrained`` / ``from_config``. ``for_generation``: attention is ``eval.attn_implementation``."""
    m = cfg.model
    attn = cfg.eval.attn_implementation if for_generation else m.attn_implementation
    kwargs: dict[str, Any] = {"dtype": torch_dtype(m.dtype), "attn_implementation": attn}
    if m.experts_implementation is not None:
        kwargs["experts_implementation"] = m.experts_implementation
    return kwargs


def check_reachable(cfg: RunConfig) -> None:
    """Model and tokenizer reachable (local path, Hub, or the HF cache)? Raise one message with the fix."""
    from gptoss_hpc.modeling.tokenizer import load_tokenizer

    m = cfg.model
    if not m.tiny:
        _check_local_folder(cfg)
        check_hub_repo("model", m.name_or_path, m.revision, _MODEL_FIX.format(name=m.name_or_path))
    if m.tokenizer == "auto" and m.tiny:
        raise ResourceNotReachableError(
            "model.tokenizer=auto has no tokenizer to load for the tiny model; use model.tokenizer=offline "
            "(the real gpt-oss tokenizer) or tiny-bpe"
        )
    if m.tokenizer in ("offline", "tiny-bpe"):
        load_tokenizer(m)  # builds the cache once; raises if the bundled vocabulary is broken
    elif m.tokenizer != "auto" and not is_local(m.tokenizer):
        check_hub_repo(
            "tokenizer",
            m.tokenizer,
            None,
            "give an existing local folder or Hub id in model.tokenizer, or model.tokenizer=offline",
        )


def _check_local_folder(cfg: RunConfig) -> None:
    """A path that is not there, or a folder whose depth differs from model.num_hidden_layers: say so now."""
    import json

    m = cfg.model
    path = Path(m.name_or_path).expanduser()
    looks_local = m.name_or_path.startswith(("/", "./", "../", "~")) or path.exists()
    if looks_local and not (path / "config.json").is_file():
        raise GptossHpcError(
            f"model.name_or_path={m.name_or_path} is no model folder (no config.json there); give a gpt-oss folder "
            "(`hf download openai/gpt-oss-20b --local-dir DIR`, or `python -m gptoss_hpc.synth_checkpoint --size "
            "20b DIR` for random weights)"
        )
    if looks_local:
        layers = json.loads((path / "config.json").read_text()).get("num_hidden_layers")
        if layers is not None and layers != m.num_hidden_layers:
            raise GptossHpcError(
                f"model.num_hidden_layers={m.num_hidden_layers} but {path}/config.json has {layers}; "
                f"set model.num_hidden_layers={layers}"
            )


def cuda_device_map() -> dict[str, int] | None:
    """Load straight onto this process's GPU (LOCAL_RANK): MXFP4 experts are dequantized there in
    milliseconds, and no rank holds a full host-RAM copy of the model. None on a CPU-only machine."""
    import torch

    if not torch.cuda.is_available():
        return None
    return {"": int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()}


def load_inference_model(folder: str | Path, cfg: RunConfig | None = None) -> PreTrainedModel:
    """A saved (merged, bf16/fp32) model for generation: on the GPU when there is one, loaded there directly.
    ``cfg`` picks dtype and kernels; without it the folder's own dtype is kept. Attention is
    ``eval.attn_implementation`` (eager by default: see EvalConfig)."""
    from transformers import AutoModelForCausalLM

    kwargs = (
        load_kwargs(cfg, for_generation=True) if cfg is not None else {"dtype": "auto", "attn_implementation": "eager"}
    )
    kwargs["device_map"] = cuda_device_map()
    model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    model.config.use_cache = True
    return model.eval()


def load_base_model(
    cfg: RunConfig, paths: PointPaths | None, *, for_training: bool, for_generation: bool = False
) -> PreTrainedModel:
    """The base model; ``for_generation`` switches attention to ``eval.attn_implementation`` (eval, serve)."""
    model = _load_tiny(cfg, paths) if cfg.model.tiny else _load_pretrained(cfg, for_training)
    model.config.use_cache = not for_training
    if for_generation and model.config._attn_implementation != cfg.eval.attn_implementation:
        model.set_attn_implementation(cfg.eval.attn_implementation)
    if not for_training:
        model.eval()
    return model


def _load_pretrained(cfg: RunConfig, for_training: bool) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    m = cfg.model
    if m.experts_dtype == "mxfp4" and for_training:
        # merge/eval/serve load the bf16-dequantized base (the same W), which PEFT can merge into
        return _load_mxfp4(cfg)
    kwargs: dict = {
        "revision": m.revision,
        **load_kwargs(cfg),
        "use_cache": not for_training,
        "trust_remote_code": m.trust_remote_code,
    }
    device_map = cuda_device_map()
    if device_map is not None:
        kwargs["device_map"] = device_map
    if m.dequantize_mxfp4 and is_mxfp4_checkpoint(m.name_or_path):
        from transformers import Mxfp4Config

        # dequantize=True never touches the `kernels` package or the Hub's kernels: transformers converts
        # *_blocks/*_scales with convert_moe_packed_tensors on the device the weights load to (CPU or GPU).
        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    log.info("loading %s (%s)", m.name_or_path, ", ".join(f"{k}={v}" for k, v in kwargs.items()))
    try:
        return AutoModelForCausalLM.from_pretrained(m.name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        if is_local(m.name_or_path):
            raise GptossHpcError(f"model at {m.name_or_path} could not be loaded: {exc}") from exc
        raise unreachable("model", m.name_or_path, m.revision, exc, _MODEL_FIX.format(name=m.name_or_path)) from exc


def is_mxfp4_checkpoint(name_or_path: str) -> bool:
    """True unless a local folder's config.json says it is not MXFP4 (a merged bf16 model, say): a Hub id is
    assumed to be gpt-oss as shipped."""
    import json

    config = Path(name_or_path).expanduser() / "config.json"
    if not config.is_file():
        return True
    quant = json.loads(config.read_text()).get("quantization_config") or {}
    return quant.get("quant_method") == "mxfp4"


def mxfp4_folder(cfg: RunConfig) -> str:
    """The MXFP4 checkpoint's local folder: model.name_or_path, or its Hub snapshot (json + safetensors only)."""
    m = cfg.model
    if is_local(m.name_or_path):
        return m.name_or_path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(m.name_or_path, revision=m.revision, allow_patterns=["*.json", "*.safetensors"])
    except Exception as exc:
        raise unreachable("model", m.name_or_path, m.revision, exc, _MODEL_FIX.format(name=m.name_or_path)) from exc


def _device() -> str:
    import torch

    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"


def _load_mxfp4(cfg: RunConfig) -> PreTrainedModel:
    """MXFP4-resident experts: read the checkpoint's shards tensor by tensor straight onto this rank's GPU (the
    trainer's later .to(device) is then a no-op), never building a bf16 expert stack (modeling/mxfp4/model.py)."""
    from gptoss_hpc.modeling.mxfp4.model import load_mxfp4_model

    m = cfg.model
    return load_mxfp4_model(
        mxfp4_folder(cfg), _device(), torch_dtype(m.dtype), m.attn_implementation, m.experts_implementation
    )


def load_adapter_model(cfg: RunConfig, paths: PointPaths, adapter: str | Path) -> Any:
    """The base + the LoRA adapter, unmerged (eval.model=adapter), for generation. With model.experts_dtype=mxfp4
    the experts stay MXFP4 (120b: ~61 GB instead of ~218 GB of bf16); PEFT's disable_adapter() gives the base."""
    if mxfp4_resident(cfg):
        from gptoss_hpc.modeling.mxfp4.model import load_mxfp4_peft_model

        m = cfg.model
        model = load_mxfp4_peft_model(
            mxfp4_folder(cfg), adapter, _device(), torch_dtype(m.dtype), cfg.eval.attn_implementation,
            m.experts_implementation,
        )  # fmt: skip
    else:
        from peft import PeftModel

        base = load_base_model(cfg, paths, for_training=False, for_generation=True)
        if _device() != "cpu" and next(base.parameters()).device.type == "cpu":  # the tiny model is built
            base = base.to(_device())
        model = PeftModel.from_pretrained(base, str(adapter))
    model.config.use_cache = True
    return model.eval()


def _tiny_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _load_tiny(cfg: RunConfig, paths: PointPaths | None) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    kwargs = load_kwargs(cfg)
    if paths is not None and _tiny_complete(paths.base):
        log.info("loading the tiny base from %s", paths.base)
        return AutoModelForCausalLM.from_pretrained(str(paths.base), **kwargs)
    model = build_tiny_model(cfg)
    from gptoss_hpc.modeling.distributed import global_rank

    if paths is not None and global_rank() == 0:
        _save_atomic(model, paths.base)
    return model


def build_tiny_model(cfg: RunConfig) -> PreTrainedModel:
    """gpt-oss from the bundled json, vocab sized to the tokenizer, weights seeded by train.seed."""
    import torch
    from transformers import AutoModelForCausalLM, GptOssConfig

    from gptoss_hpc.modeling.tokenizer import load_tokenizer
    from gptoss_hpc.resources import tiny_config_path

    m = cfg.model
    tok = load_tokenizer(m)
    config = GptOssConfig.from_json_file(str(tiny_config_path(m.tiny_config)))
    config.vocab_size = len(tok)
    config.bos_token_id = tok.bos_token_id
    config.eos_token_id = tok.eos_token_id
    config.pad_token_id = tok.pad_token_id
    if config.num_hidden_layers != m.num_hidden_layers:
        raise GptossHpcError(
            f"model.num_hidden_layers={m.num_hidden_layers} but {m.tiny_config}.json has "
            f"{config.num_hidden_layers}; set model.num_hidden_layers={config.num_hidden_layers}"
        )
    kwargs = load_kwargs(cfg)
    torch.manual_seed(cfg.train.seed)
    model = AutoModelForCausalLM.from_config(config, **kwargs)
    log.info("built tiny gpt-oss: %d params, vocab %d, seed %d", model.num_parameters(), len(tok), cfg.train.seed)
    return model


def _save_atomic(model: PreTrainedModel, target: Path) -> None:
    if _tiny_complete(target):
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".base.", suffix=".tmp"))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
        log.info("saved the tiny base to %s", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
