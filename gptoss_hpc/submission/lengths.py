"""The launch measures every row before anything is submitted, then decides ``train.max_length`` per point.

    measured = measure(cfg)                       # every training and held-out row, as the train stage renders it
    resolution = config.lengths.resolve(cfg, measured, fits=..., context=...)

Lengths go through the row-lengths cache (gptoss_hpc.data.length.measured_lengths), which the train stage reads
too: what the launch measured is not tokenized again.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from gptoss_hpc.config.lengths import Measured

if TYPE_CHECKING:
    from gptoss_hpc.config.schema import RunConfig

log = logging.getLogger(__name__)


class Pending(Exception):
    """The rows cannot be read without the network yet (a Hub dataset or tokenizer not in the local cache): the
    launch measures them after its pre-fetch, before anything is submitted."""


def _cached_snapshot(repo_id: str, repo_type: str, revision: str | None, **filters: Any) -> str | None:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, repo_type=repo_type, revision=revision, local_files_only=True, **filters)
    except Exception:  # not in the local cache
        return None


def _sources(cfg: RunConfig, offline: bool, folders: dict[str, str]) -> tuple[RunConfig, str | None]:
    """(cfg whose tokenizer is local where it can be, the Hub dataset's local folder or None). Offline, a Hub
    tokenizer or dataset that is not cached raises Pending; online, the Hub is read as the jobs would read it."""
    from dataclasses import replace

    from gptoss_hpc.modeling.hub import _TOKENIZER_FILES, is_local

    m, d = cfg.model, cfg.data
    kind = m.tokenizer
    name = m.name_or_path if kind == "auto" else kind
    if not (m.tiny or kind in ("offline", "tiny-bpe") or is_local(name)):
        folder = folders.get("tokenizer") or (folders.get("model") if kind == "auto" else None)
        if folder is None and offline:
            folder = _cached_snapshot(
                name, "model", m.revision if kind == "auto" else None, allow_patterns=_TOKENIZER_FILES
            )
            if folder is None:
                raise Pending(f"the tokenizer {name} is on the Hub")
        if folder is not None:
            cfg = replace(cfg, model=replace(m, tokenizer=folder))
    hub_folder = None
    if d.source == "hub" and d.name:
        hub_folder = folders.get("dataset") or (_cached_snapshot(d.name, "dataset", d.revision) if offline else None)
        if hub_folder is None and offline:
            raise Pending(f"the dataset {d.name} is on the Hub")
    return cfg, hub_folder


def measure(cfg: RunConfig, *, offline: bool = False, folders: dict[str, str] | None = None) -> Measured:
    """Length of every row of ``cfg.data`` (training rows first, then held-out), with its ``<file>:<row>``.
    ``offline``: raise Pending rather than reach the Hub; ``folders``: the launch's pre-fetched snapshots by kind
    (model, tokenizer, dataset)."""
    from gptoss_hpc.data.length import SOURCE_KEY, measured_lengths, training_chat_template
    from gptoss_hpc.data.load import load_data
    from gptoss_hpc.modeling.tokenizer import load_tokenizer

    cfg, hub_folder = _sources(cfg, offline, folders or {})
    loaded = load_data(cfg, hub_folder=hub_folder)  # validates every row (a bad row stops the launch: file:row)
    rows = loaded.train_rows + loaded.eval_rows
    tokenizer = load_tokenizer(cfg.model)
    tokenizer.model_max_length = 1 << 40  # measuring, not encoding for a model: no "longer than the model" warning
    template = training_chat_template(tokenizer, cfg.train.assistant_only_loss)
    return Measured(
        lengths=measured_lengths(tokenizer, rows, template, what=f"rows of {loaded.stats['where']}"),
        labels=[r[SOURCE_KEY] for r in rows],
        train_rows=len(loaded.train_rows),
        where=str(loaded.stats["where"]),
    )


def decide(
    cfg: RunConfig,
    overrides: list[str],
    measured_by_data: dict[str, Measured],
    *,
    offline: bool = True,
    folders: dict[str, str] | None = None,
):
    """``config.lengths.resolve`` for one point: measures its data (once per distinct data + tokenizer in a launch)
    and asks the memory plan which lengths fit the card. A config without a train stage is returned as is.
    ``offline`` (composition): rows behind the Hub are left for after the pre-fetch (``unmeasured``)."""
    from dataclasses import asdict

    from gptoss_hpc.config.attention import attention_length_problems
    from gptoss_hpc.config.fit import trains_on_card, user_set
    from gptoss_hpc.config.lengths import Resolution, resolve
    from gptoss_hpc.config.memory import arch_for
    from gptoss_hpc.errors import ResourceNotReachableError

    if "train" not in cfg.stages:
        return Resolution(cfg)
    key = json.dumps([asdict(cfg.data), asdict(cfg.model), cfg.train.assistant_only_loss], sort_keys=True, default=str)
    if key not in measured_by_data:
        try:
            measured_by_data[key] = measure(cfg, offline=offline, folders=folders)
        except Pending as exc:
            note = f"train.max_length={cfg.train.max_length or 'auto'}: the rows are measured at launch ({exc})"
            return Resolution(cfg, lines=[note], unmeasured=str(exc))
        except ResourceNotReachableError as exc:
            # a dry run (or a script that only renders) goes on; launch.py refuses to submit an unmeasured point
            note = f"train.max_length={cfg.train.max_length or 'auto'}: the rows were not measured ({exc})"
            return Resolution(cfg, lines=[note.splitlines()[0]], unmeasured=str(exc))
    arch = arch_for(cfg)
    res = resolve(
        cfg,
        measured_by_data[key],
        fits=lambda candidate: trains_on_card(candidate, overrides),
        context=arch.max_position_embeddings if arch is not None else None,
        user_keys=user_set(overrides),  # FIT_KEYS: the micro-batch and accumulation keys among them
    )
    if arch is not None and res.cfg.train.max_length is not None and not res.problems:
        # a length the attention path cannot train exactly is refused, not trained wrongly
        res.problems += attention_length_problems(res.cfg, arch, res.cfg.train.max_length)
    return res


def auto_overrides(overrides: list[str]) -> list[str]:
    """``train.max_length=auto`` (also inside a sweep's value list) as the schema's null."""
    out = []
    for o in overrides:
        key, eq, value = o.partition("=")
        if eq and key.lstrip("+~") == "train.max_length":
            value = ",".join("null" if v.strip() == "auto" else v for v in value.split(","))
        out.append(f"{key}{eq}{value}")
    return out
