"""``python -m gptoss_hpc.data {convert,validate,stats}``: the data tools' command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from gptoss_hpc.errors import GptossHpcError

EPILOG = """examples:
  python -m gptoss_hpc.data validate data/train.jsonl
  python -m gptoss_hpc.data convert --format think-tags ja_reasoning.parquet data/ja --language Japanese
  python -m gptoss_hpc.data convert --format think-tags qa.csv data/qa --question-column prompt \\
      --answer-column response --language-column lang --persona "You are a careful math tutor."
  python -m gptoss_hpc.data stats data=sample model=tiny_gpt_oss
  python -m gptoss_hpc.data stats data=local data.path=data/ja/ja_reasoning.jsonl train.max_length=4096
"""

CONVERT_EPILOG = """The think-tags format: the answer column holds "<think>reasoning</think>final answer".
Output rows: system "reasoning language: <lang>" (+ newline + persona), user = question,
assistant = thinking (inside the tags) + content (the rest). Writes OUTDIR/<stem>.parquet and
OUTDIR/<stem>.jsonl (atomically; nothing on failure).

Rows without tags are kept as plain answers with no thinking. Rows with broken tags (unclosed <think>,
stray </think>, nested or several blocks) are reported by row and not converted; empty answers are
reported and dropped. Rows: 1-based line numbers for .jsonl, 0-based indices for .parquet/.csv.

examples:
  python -m gptoss_hpc.data convert --format think-tags japanese_reasoning.jsonl data/ja --language Japanese
  python -m gptoss_hpc.data convert --format think-tags qa.csv out --question-column prompt \\
      --answer-column response --language-column lang --persona "You are a careful math tutor."
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gptoss_hpc.data",
        description="Training data tools: convert reasoning sets, validate rows, token-length stats.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    conv = sub.add_parser(
        "convert",
        help="convert a question/answer set with <think> tags into messages rows",
        epilog=CONVERT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    conv.add_argument("--format", required=True, choices=["think-tags"], help="input format")
    conv.add_argument("input", type=Path, help="JSONL, Parquet or CSV file")
    conv.add_argument("outdir", type=Path, help="folder for <stem>.parquet and <stem>.jsonl")
    conv.add_argument("--question-column", default="question", help="column with the user turn (default: question)")
    conv.add_argument("--answer-column", default="answer", help="column with <think>…</think>answer (default: answer)")
    lang = conv.add_mutually_exclusive_group(required=True)
    lang.add_argument("--language", help="reasoning language of every row, e.g. Japanese")
    lang.add_argument("--language-column", help="column holding each row's reasoning language")
    conv.add_argument("--persona", help="text added to the system turn after the reasoning-language line")

    val = sub.add_parser("validate", help="check every row of a JSONL/Parquet/JSON file or folder")
    val.add_argument("path", type=Path)
    val.add_argument("--messages-field", default="messages", help="column holding the turns (default: messages)")
    val.add_argument(
        "--reasoning-language-field",
        default="reasoning_language",
        help="column whose value becomes the system line 'reasoning language: <x>' (data.reasoning_language_field; "
        "default: reasoning_language; '' for none)",
    )
    val.add_argument(
        "--multi-turn", default="last", choices=["last", "split"], help="data.multi_turn of the run (default: last)"
    )

    st = sub.add_parser(
        "stats",
        help="token-length percentiles and a histogram of the configured data",
        description="Composes the config from Hydra overrides, loads the data and model.tokenizer.",
    )
    st.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=sample model=tiny_gpt_oss")
    st.add_argument("--out", type=Path, default=Path("data_token_lengths.png"), help="PNG path")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "convert":
            return _convert(args)
        if args.command == "validate":
            return _validate(args)
        return _stats(args)
    except GptossHpcError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _convert(args: argparse.Namespace) -> int:
    from gptoss_hpc.data.convert import convert_think_tags

    report = convert_think_tags(
        args.input,
        args.outdir,
        question_column=args.question_column,
        answer_column=args.answer_column,
        language=args.language,
        language_column=args.language_column,
        persona=args.persona,
    )
    c = report.counts()
    print(f"rows in:                {c['rows_in']}")
    print(f"rows out:               {c['rows_out']}")
    print(f"  with thinking:        {c['with_thinking']}")
    print(f"  without <think> tags: {c['without_tags']} (kept as plain answers, no thinking)")
    for label in report.without_tags[:20]:
        print(f"    {label}")
    print(f"broken tag structure:   {c['broken_tags']} (not converted)")
    for line in report.broken:
        print(f"    {line}")
    print(f"empty answers:          {c['empty']} (dropped)")
    for line in report.empty:
        print(f"    {line}")
    for path in report.outputs:
        print(f"wrote {path}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from gptoss_hpc.config.schema import DataConfig
    from gptoss_hpc.data.load import check_file
    from gptoss_hpc.data.rows import bad_rows_error

    d = DataConfig(
        messages_field=args.messages_field,
        reasoning_language_field=args.reasoning_language_field or None,
        multi_turn=args.multi_turn,
    )
    result = check_file(args.path, d)
    if result.problems:
        print(bad_rows_error(result.problems, result.rows_read, where=str(args.path)), file=sys.stderr)
        return 1
    print(f"{args.path}: {result.rows_read} rows OK")
    if result.notes:  # kept, but changed to fit Harmony (README "Data")
        print(f"{len(result.notes)} row(s) changed:")
        for note in result.notes[:20]:
            print(f"  {note}")
    return 0


def _stats(args: argparse.Namespace) -> int:
    from gptoss_hpc.config.io import compose, to_run_config
    from gptoss_hpc.config.lengths import bucket
    from gptoss_hpc.data.length import measured_lengths, training_chat_template
    from gptoss_hpc.data.load import load_data
    from gptoss_hpc.data.stats import length_stats, write_histogram
    from gptoss_hpc.modeling.tokenizer import load_tokenizer

    cfg = to_run_config(compose(args.overrides))
    tokenizer = load_tokenizer(cfg.model)
    loaded = load_data(cfg)  # no tokenizer: measure every row before the max_length policy
    rows = loaded.train_rows + loaded.eval_rows
    template = training_chat_template(tokenizer, cfg.train.assistant_only_loss)  # as the train stage renders rows
    lengths = measured_lengths(tokenizer, rows, template, what=f"rows of {loaded.stats['where']}")
    auto = cfg.train.max_length is None
    max_length = bucket(max(lengths)) if auto else cfg.train.max_length
    s = length_stats(lengths, max_length)
    print(
        f"data: {loaded.stats['where']} ({len(rows)} rows: {len(loaded.train)} train, {loaded.stats['eval_rows']} eval)"
    )
    print(f"tokenizer: model.tokenizer={cfg.model.tokenizer} (vocab {len(tokenizer)})")
    print(f"tokens per row: p50={s['p50']} p90={s['p90']} p99={s['p99']} max={s['max']} mean={s['mean']}")
    if auto:
        print(f"train.max_length=auto: {max_length} (the longest row, bucketed; the launch also checks the card)")
    else:
        print(
            f"over train.max_length={s['max_length']}: {s['over_max_length']} rows "
            f"({100 * s['share_over_max_length']:.1f}%), policy data.max_length_policy={cfg.data.max_length_policy}"
        )
    path = write_histogram(lengths, max_length, args.out, title=str(loaded.stats["where"]))
    print(f"histogram: {path.resolve()}")
    return 0
