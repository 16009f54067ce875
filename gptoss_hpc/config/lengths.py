"""``train.max_length=auto``: the data decides the length, the card decides what fits (pure, no torch).

The launch measures every training and held-out row (gptoss_hpc.submission.lengths) and calls ``resolve``:

- auto: ``max_length`` becomes the longest row rounded up to a bucket (``bucket``), as long as some setting of
  ``train.fit_memory`` fits ``cluster.gpu_memory_gib`` at that length and the model's context holds it. The
  micro-batch stays a token budget of about ``per_device_train_batch_size x REFERENCE_ROW_TOKENS``, or one row of
  ``max_length`` when that is longer (many short rows, or one long row, packed), and
  ``gradient_accumulation_steps`` shrinks so that an optimizer step keeps the tokens it had with reference rows,
  as far as the rows allow (never below one micro-batch). Keys the command line sets are never changed.
- rows that cannot fit (longer than the longest length that fits the card, or than the model's context) are
  refused, with their count, the longest as ``file:row: N tokens`` and the fixes, unless the user asked for
  ``data.max_length_policy=drop|truncate``: then the length is the longest that fits, and the rows and tokens
  dropped or cut are counted and printed.
- an explicit ``train.max_length``: rows over it are refused unless a drop/truncate policy was asked for.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from gptoss_hpc.config.schema import RunConfig

# per_device_train_batch_size counts rows of this many tokens when train.max_length=auto (the shipped train=default
# is 4 x 2048-token micro-batches, 2 per optimizer step)
REFERENCE_ROW_TOKENS = 2048
MIN_BUCKET = 2048
LISTED = 10


def bucket(tokens: int) -> int:
    """The length a row of ``tokens`` trains at: at least 2048, else rounded up to an eighth of the next power of
    two (3,000 -> 3,072; 30,112 -> 32,768; 33,000 -> 40,960), so lengths fall on few shapes."""
    if tokens <= MIN_BUCKET:
        return MIN_BUCKET
    step = max(1, 2 ** math.ceil(math.log2(tokens)) // 8)
    return math.ceil(tokens / step) * step


def ladder(up_to: int) -> list[int]:
    """Every bucket length from MIN_BUCKET to ``up_to`` (a bucket), longest first."""
    out, n = [], MIN_BUCKET
    while n <= up_to:
        out.append(n)
        n = bucket(n + 1)
    return sorted(set(out), reverse=True)


def percentile(sorted_values: Sequence[int], q: float) -> int:
    """Nearest-rank percentile (q in 0..100) of already sorted values."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass
class Measured:
    """What the launch measured: every row's length and ``<file>:<row>``, training rows first."""

    lengths: list[int]
    labels: list[str]
    train_rows: int
    where: str = ""

    def summary(self) -> dict[str, int]:
        values = sorted(self.lengths)
        return {
            "rows": len(values),
            "tokens": sum(values),
            "p50": percentile(values, 50),
            "p90": percentile(values, 90),
            "p99": percentile(values, 99),
            "max": values[-1],
        }

    def over(self, limit: int) -> list[int]:
        """Indices of rows longer than ``limit``, longest first."""
        return sorted((i for i, n in enumerate(self.lengths) if n > limit), key=lambda i: -self.lengths[i])


@dataclass
class Resolution:
    cfg: RunConfig
    lines: list[str] = field(default_factory=list)  # what the launch prints
    problems: list[str] = field(default_factory=list)  # refusals (ConfigError lines)
    record: dict[str, object] = field(default_factory=dict)  # what the run records (pNNN/data_lengths.json)
    unmeasured: str | None = None  # why the rows could not be measured (a launch refuses to submit then)


def with_length(cfg: RunConfig, length: int, user_keys: Sequence[str]) -> RunConfig:
    """``cfg`` at ``max_length=length``, its micro-batch and accumulation rescaled from reference rows (keys the
    user set are kept)."""
    t = cfg.train
    rows, accum = t.per_device_train_batch_size, t.gradient_accumulation_steps
    reference_tokens = rows * REFERENCE_ROW_TOKENS
    if "train.per_device_train_batch_size" not in user_keys:
        rows = max(1, reference_tokens // length)
    if "train.gradient_accumulation_steps" not in user_keys:
        step_tokens = t.per_device_train_batch_size * t.gradient_accumulation_steps * REFERENCE_ROW_TOKENS
        accum = max(1, round(step_tokens / (rows * length)))
    return replace(
        cfg, train=replace(t, max_length=length, per_device_train_batch_size=rows, gradient_accumulation_steps=accum)
    )


def resolve(
    cfg: RunConfig,
    measured: Measured,
    *,
    fits: Callable[[RunConfig], bool],
    context: int | None,
    user_keys: Sequence[str] = (),
) -> Resolution:
    """The point's config with ``train.max_length`` decided (see the module docstring). ``fits(cfg)``: whether some
    setting the launch may pick trains ``cfg`` on the card; ``context``: the model's max_position_embeddings."""
    s = measured.summary()
    policy = cfg.data.max_length_policy
    auto = cfg.train.max_length is None
    lines = [
        f"data: {measured.train_rows} training + {s['rows'] - measured.train_rows} held-out rows, {s['tokens']:,} "
        f"tokens; row tokens p50 {s['p50']:,} / p90 {s['p90']:,} / p99 {s['p99']:,} / max {s['max']:,}"
    ]
    record: dict[str, object] = {**s, "policy": policy, "auto": auto}
    if auto:
        ceiling = bucket(s["max"])
        if context is not None and ceiling > context:
            ceiling = max((n for n in ladder(bucket(context)) if n <= context), default=MIN_BUCKET)
        length = next((n for n in ladder(ceiling) if fits(with_length(cfg, n, user_keys))), None)
        if length is None:
            return Resolution(cfg, lines, [_nothing_fits(cfg)], record)
        new = with_length(cfg, length, user_keys)
        why = "the longest row, bucketed" if length >= s["max"] else "the longest that fits the card and the model"
        t0, t1 = cfg.train, new.train
        step = t1.per_device_train_batch_size * length * t1.gradient_accumulation_steps
        lines.append(
            f"train.max_length=auto -> {length:,} ({why}); micro-batch {t1.per_device_train_batch_size} x {length:,} "
            f"tokens, gradient_accumulation_steps {t0.gradient_accumulation_steps} -> "
            f"{t1.gradient_accumulation_steps} ({step:,} tokens per optimizer step per GPU at most)"
        )
    else:
        new, length = cfg, cfg.train.max_length
    record["max_length"] = length
    over = measured.over(length)
    problems: list[str] = []
    if over:
        lost = sum(measured.lengths[i] for i in over)
        record.update(over_max_length=len(over), tokens_over_max_length=lost)
        if policy == "refuse":
            problems.append(f"{lines[0]}; {_refusal(cfg, measured, over, length, auto, context)}")
        else:
            verb = "dropped" if policy == "drop" else "truncated (their last answer shortened)"
            lines.append(
                f"data.max_length_policy={policy}: {len(over)} of {s['rows']} rows are longer than {length:,} tokens "
                f"and are {verb}: {lost:,} tokens in them (longest {measured.labels[over[0]]}: "
                f"{measured.lengths[over[0]]:,} tokens)"
            )
    return Resolution(new, lines, problems, record)


def _refusal(cfg: RunConfig, measured: Measured, over: list[int], length: int, auto: bool, context: int | None) -> str:
    listed = "; ".join(f"{measured.labels[i]}: {measured.lengths[i]:,} tokens" for i in over[:LISTED])
    more = f"; ... and {len(over) - LISTED} more" if len(over) > LISTED else ""
    if auto and context is not None and measured.lengths[over[0]] > context:
        limit = f"longer than the model's context (max_position_embeddings={context:,}) or than what fits"
    elif auto:
        limit = f"longer than {length:,} tokens, the longest length whose train stage fits the card"
    else:
        limit = f"longer than train.max_length={length:,}"
    card = f" cluster.gpu_memory_gib={cfg.cluster.gpu_memory_gib:g}" if cfg.cluster.gpu_memory_gib else ""
    fixes = [
        f"data.max_length_policy=drop (drops those {len(over)} rows)",
        "data.max_length_policy=truncate (shortens their last answer to fit)",
    ]
    if auto:
        fixes.append(f"a card with more memory than{card or ' this one'}")
        fixes.append(f"train.max_length={length} with one of the policies above")
    else:
        fixes.append("train.max_length=auto (follow the data where the card allows)")
    return (
        f"{len(over)} of {len(measured.lengths)} rows are {limit}: {listed}{more}. Nothing is dropped unless you ask; "
        f"fixes: {'; '.join(fixes)}"
    )


def _nothing_fits(cfg: RunConfig) -> str:
    return (
        f"no setting of the train stage fits cluster.gpu_memory_gib={cfg.cluster.gpu_memory_gib} even at "
        f"{MIN_BUCKET}-token rows; see `python -m gptoss_hpc.plan` and use a larger card"
    )
