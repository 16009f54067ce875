"""Load the training data a RunConfig names: hub, local files, or the bundled sample.

    train, held_out = load_datasets(cfg, tokenizer)      # datasets.Dataset with one `messages` column

Order: read → validate every row (bad rows raise DataError listing ``file:row: reason``, or are skipped
with ``data.skip_bad_rows=true``; extra system/developer turns are merged into the leading one, noted per
row, see gptoss_hpc.data.turns) → ``data.max_rows`` cap → held-out split (``data.eval_path`` file, else
a seeded ``data.eval_fraction``, by conversation) → ``data.multi_turn=split`` (one row per assistant
turn) → ``train.max_length`` policy when a tokenizer is given (gptoss_hpc.data.length; ``train.max_length=auto``
is resolved by the launch, or here from the longest row when a job runs a config that still says auto).
Nothing is written: local files are read directly (no datasets cache), and failures raise before any output.
While loading, each row carries its ``<file>:<row>`` label (``length.SOURCE_KEY``), which errors name; it is
not a column of the returned datasets (``LoadedData.train_rows`` keeps it).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptoss_hpc.data.readers import read_rows
from gptoss_hpc.data.rows import Normalised, RawRow, bad_rows_error, normalise_rows
from gptoss_hpc.data.turns import MULTI_TURN_POLICIES, control_token_pattern, split_assistant_turns
from gptoss_hpc.errors import DataError, ResourceNotReachableError

if TYPE_CHECKING:
    from datasets import Dataset

    from gptoss_hpc.config.schema import DataConfig, RunConfig

log = logging.getLogger(__name__)

SAMPLE_FILE = "multilingual_reasoning.jsonl"
MAX_NOTES_LOGGED = 20


@dataclass
class LoadedData:
    train: Dataset
    eval: Dataset | None
    # rows_read, bad_rows_skipped, train_rows, eval_rows, over_max_length, dropped_too_long, truncated ...
    stats: dict[str, Any] = field(default_factory=dict)
    # ``<file>:<row>: <change>`` for every kept row that was changed (merged system/developer turns ...)
    notes: list[str] = field(default_factory=list)
    # the rows behind ``train`` / ``eval``, each with its ``<file>:<row>`` under length.SOURCE_KEY
    train_rows: list[dict[str, Any]] = field(default_factory=list)
    eval_rows: list[dict[str, Any]] = field(default_factory=list)


def load_datasets(cfg: RunConfig, tokenizer: Any = None) -> tuple[Dataset, Dataset | None]:
    """(train, held-out eval or None), each a Dataset with a single ``messages`` column."""
    loaded = load_data(cfg, tokenizer)
    return loaded.train, loaded.eval


def load_data(cfg: RunConfig, tokenizer: Any = None, *, hub_folder: str | None = None) -> LoadedData:
    """Like load_datasets, plus the counts (also logged at INFO). ``hub_folder``: a local snapshot of the
    data.source=hub dataset (the launch's pre-fetch) to read instead of the Hub."""
    from datasets import Dataset

    from gptoss_hpc.data.length import SOURCE_KEY

    d = cfg.data
    where, raw = source_rows(d, hub_folder)
    if d.multi_turn not in MULTI_TURN_POLICIES:
        raise DataError(f"data.multi_turn={d.multi_turn!r}: use {' or '.join(MULTI_TURN_POLICIES)}")
    opts = row_check_options(d, tokenizer)
    main = normalise_rows(raw, **opts)
    held: Normalised | None = None
    if d.eval_path:
        held = normalise_rows(read_rows(d.eval_path), **opts)
    problems = main.problems + (held.problems if held else [])
    rows_read = main.rows_read + (held.rows_read if held else 0)
    if problems and not d.skip_bad_rows:
        places = where + (f" and {d.eval_path}" if d.eval_path else "")
        raise bad_rows_error(problems, rows_read, where=places)
    for p in problems[:5]:
        log.warning("skipped bad row %s", p)
    notes = main.notes + (held.notes if held else [])
    for note in notes[:MAX_NOTES_LOGGED]:
        log.warning("changed row %s", note)
    if len(notes) > MAX_NOTES_LOGGED:
        log.warning("... and %d more changed rows", len(notes) - MAX_NOTES_LOGGED)

    stats: dict[str, Any] = {
        "source": d.source,
        "where": where,
        "rows_read": rows_read,
        "bad_rows_skipped": len(problems),
        "rows_changed": len(notes),
    }
    rows = _labelled(main)
    if not rows:
        raise DataError(f"{where}: no usable rows ({main.rows_read} read, {len(main.problems)} bad)")
    if d.max_rows is not None and len(rows) > d.max_rows:
        stats["capped_by_max_rows"] = len(rows) - d.max_rows
        rows = rows[: d.max_rows]

    if held is not None:
        train_rows, eval_rows = rows, _labelled(held)
        stats["eval_from"] = d.eval_path
    else:
        train_rows, eval_rows = split_rows(rows, d.eval_fraction, d.seed)
        stats["eval_from"] = f"eval_fraction={d.eval_fraction} seed={d.seed}" if eval_rows else None
    stats["multi_turn"] = d.multi_turn
    if d.multi_turn == "split":  # after the held-out split: a conversation's turns stay on one side
        n_before = len(train_rows) + len(eval_rows or [])
        train_rows = split_rows_per_assistant_turn(train_rows)
        eval_rows = split_rows_per_assistant_turn(eval_rows) if eval_rows else eval_rows
        stats["rows_added_by_split"] = len(train_rows) + len(eval_rows or []) - n_before

    if tokenizer is not None:
        train_rows, eval_rows = _apply_length_policy(cfg, tokenizer, train_rows, eval_rows, stats, where)

    stats["train_rows"] = len(train_rows)
    stats["eval_rows"] = len(eval_rows) if eval_rows else 0
    log.info("data: %s", ", ".join(f"{k}={v}" for k, v in stats.items()))

    def columns(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k != SOURCE_KEY} for r in rs]

    train = Dataset.from_list(columns(train_rows))
    held_out = Dataset.from_list(columns(eval_rows)) if eval_rows else None
    return LoadedData(train, held_out, stats, notes, train_rows, eval_rows or [])


def _labelled(n: Normalised) -> list[dict[str, Any]]:
    from gptoss_hpc.data.length import SOURCE_KEY

    return [{**row, SOURCE_KEY: label} for row, label in zip(n.rows, n.labels, strict=True)]


def _apply_length_policy(
    cfg: RunConfig,
    tokenizer: Any,
    train_rows: list[dict[str, Any]],
    eval_rows: list[dict[str, Any]] | None,
    stats: dict[str, Any],
    where: str,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """data.max_length_policy over both splits (train.max_length=auto: the bucket of the longest row). Lengths come
    from the row-lengths cache the launch filled."""
    from gptoss_hpc.config.lengths import bucket
    from gptoss_hpc.data.length import apply_max_length, measured_lengths, training_chat_template

    template = training_chat_template(tokenizer, cfg.train.assistant_only_loss)
    lengths = measured_lengths(tokenizer, train_rows + (eval_rows or []), template)
    train_lengths, eval_lengths = lengths[: len(train_rows)], lengths[len(train_rows) :]
    max_length, policy = cfg.train.max_length, cfg.data.max_length_policy
    if max_length is None:
        max_length = bucket(max(train_lengths + eval_lengths))
        log.warning("train.max_length=auto: %d (the longest row, bucketed); the launch resolves it", max_length)
    train_rows, counts = apply_max_length(
        train_rows, tokenizer, max_length, policy, chat_template=template, lengths=train_lengths
    )
    if eval_rows:
        eval_rows, eval_counts = apply_max_length(
            eval_rows, tokenizer, max_length, policy, chat_template=template, lengths=eval_lengths
        )
        counts = {k: v + eval_counts[k] for k, v in counts.items()}
    stats.update(counts, max_length=max_length, max_length_policy=policy)
    if not train_rows:
        raise DataError(
            f"{where}: every training row is longer than train.max_length={max_length} tokens; "
            "raise train.max_length or use data.max_length_policy=truncate"
        )
    return train_rows, eval_rows


def row_check_options(d: DataConfig, tokenizer: Any = None) -> dict[str, Any]:
    """normalise_rows' options for data config ``d``: the same row check in ``data validate`` and the train stage."""
    return {
        "messages_field": d.messages_field,
        "reasoning_language_field": d.reasoning_language_field,
        "control_tokens": control_token_pattern(_special_strings(tokenizer)),
        "multi_turn": d.multi_turn,
    }


def check_file(path: str | Path, d: DataConfig) -> Normalised:
    """``python -m gptoss_hpc.data validate``: every row of a file through the train stage's row check."""
    return normalise_rows(read_rows(path), **row_check_options(d))


def split_rows_per_assistant_turn(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per assistant turn; each keeps its source label with the turn's number (``file:row#k``)."""
    from gptoss_hpc.data.length import SOURCE_KEY

    out = []
    for row in rows:
        for k, turns in enumerate(split_assistant_turns(row["messages"]), 1):
            new = {**row, "messages": turns}
            if SOURCE_KEY in row:
                new[SOURCE_KEY] = f"{row[SOURCE_KEY]}#{k}"
            out.append(new)
    return out


def _special_strings(tokenizer: Any) -> list[str]:
    """The tokenizer's special-token strings (all of them count as control tokens in message text)."""
    if tokenizer is None:
        return []
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return [t.content for t in added.values() if getattr(t, "special", False)] + list(
        getattr(tokenizer, "all_special_tokens", [])
    )


def split_rows(
    rows: list[dict[str, Any]], eval_fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Seeded held-out split; both parts keep the file order. At least one row each side."""
    if not eval_fraction:
        return rows, None
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"data.eval_fraction must be in [0, 1) (got {eval_fraction})")
    n = len(rows)
    n_eval = max(1, round(n * eval_fraction))
    if n - n_eval < 1:
        raise DataError(
            f"only {n} row(s): cannot hold out data.eval_fraction={eval_fraction} and still train; "
            "add rows, set data.eval_path, or data.eval_fraction=0"
        )
    picked = set(random.Random(seed).sample(range(n), n_eval))
    train = [r for i, r in enumerate(rows) if i not in picked]
    held = [r for i, r in enumerate(rows) if i in picked]
    return train, held


def source_rows(d: DataConfig, hub_folder: str | None = None) -> tuple[str, Iterator[RawRow]]:
    """(a name for messages, the raw rows) of data.source (``hub_folder``: a local snapshot of the Hub dataset)."""
    if d.source == "local":
        if not d.path:
            raise DataError("data.path is required for data.source=local; data.path=/path/to/train.jsonl")
        return d.path, read_rows(d.path)
    if d.source == "sample":
        path = sample_path()
        return str(path), read_rows(path)
    if d.source == "hub":
        if not d.name:
            raise DataError("data.name is required for data.source=hub; e.g. HuggingFaceH4/Multilingual-Thinking")
        where = f"{d.name}[{d.split}]"
        ds = load_hub_dataset(d.name, d.split, d.revision, folder=hub_folder)
        return where, (RawRow(f"{where}:{i}", row) for i, row in enumerate(ds))
    raise DataError(f"data.source={d.source!r}: use hub, local or sample")


def sample_path() -> Path:
    """The bundled multilingual reasoning sample (66 rows, 6 reasoning languages)."""
    ref = resources.files("gptoss_hpc.data").joinpath("sample", SAMPLE_FILE)
    path = Path(str(ref))
    if not path.is_file():
        raise DataError(f"the bundled sample {SAMPLE_FILE} is missing from the installed package ({path})")
    return path


def _offline_snapshot(name: str, revision: str | None) -> str | None:
    """With HF_HUB_OFFLINE=1, the dataset's folder in the Hub cache (the launcher's prefetch put it there).

    datasets' own offline mode reads only its processed cache, not a hub snapshot, so it is loaded as a folder.
    """
    from huggingface_hub import constants, snapshot_download

    if not constants.HF_HUB_OFFLINE:
        return None
    try:
        return snapshot_download(name, repo_type="dataset", revision=revision, local_files_only=True)
    except Exception:
        return None  # not prefetched: datasets raises its own offline error, turned into the fix below


def load_hub_dataset(name: str, split: str, revision: str | None, folder: str | None = None) -> Any:
    """datasets.load_dataset, with offline / gated / not-found turned into ResourceNotReachableError."""
    import datasets

    try:
        source = folder or _offline_snapshot(name, revision) or name
        return datasets.load_dataset(source, split=split, revision=None if folder else revision)
    except Exception as e:  # DatasetNotFoundError, GatedRepoError, ConnectionError, OfflineModeIsEnabled ...
        raise ResourceNotReachableError(
            f"dataset {name!r} (split={split!r}, revision={revision or 'default'}) could not be loaded: "
            f"{type(e).__name__}: {e}\n"
            "Fix: check the name and your network; for a gated or private dataset export HF_TOKEN "
            "(and accept its terms on the Hub); on a machine without Hub access copy the files and use "
            "data=local data.path=/path/to/train.jsonl (or .parquet)."
        ) from e
