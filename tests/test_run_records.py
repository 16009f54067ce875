"""What each sweep point kept and cost: the per-micro-batch document accounting (CPU side, no host read), the steady
rate, and the facts `status` and the report print from a point's records, old run dirs included ("-").

Real: TRL's collator, the train stage's trainer class (over a stand-in base class that records what reaches the
forward, named ``RecordingBase``), the status CLI and the report on run dirs written as the stages write them. The
real train stage on a sweep carries its assertions in tests/test_pipeline_slurm.py (no second slow run here)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_host_syncs import no_host_reads

from gptoss_hpc.config import compose, to_run_config
from gptoss_hpc.config.flops import train_flops
from gptoss_hpc.config.memory import arch_for
from gptoss_hpc.modeling.useful_work import DOC_LENGTHS, DocumentLengthsCollator, UsefulWork, document_lengths
from gptoss_hpc.monitor.records import fact_cells, facts, point_facts, steady_rate, write_data_record
from gptoss_hpc.paths import PointPaths, RunPaths
from gptoss_hpc.submission.manifest import JobRecord, Manifest, PointRecord

CFG = to_run_config(compose(["experiment=demo", "model.tokenizer=tiny-bpe"]))


def test_document_lengths_leave_the_collators_padding_out_and_survive_pickling():
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    features = [{"input_ids": [5, 6, 7, 8, 9]}, {"input_ids": [3, 4, 2]}]
    for inner in (
        DataCollatorForLanguageModeling(pad_token_id=0, pad_to_multiple_of=16),
        DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True, pad_to_multiple_of=16),
    ):
        batch = pickle.loads(pickle.dumps(DocumentLengthsCollator(inner)))(features)
        assert batch["input_ids"].numel() % 16 == 0  # padded: 16 or 32 positions, 8 of them real
        assert batch[DOC_LENGTHS] == (5, 3)
    packed = [{"input_ids": list(range(9)), "seq_lengths": [4, 5]}, {"input_ids": [1, 2]}]
    assert document_lengths(packed) == (4, 5, 2)


def test_the_trainer_counts_documents_without_a_host_read_and_the_model_never_sees_the_key():
    from gptoss_hpc.modeling.trainer import trainer_class

    class RecordingBase:
        """Stands in for SFTTrainer: keeps what training_step / prediction_step / log were given."""

        def __init__(self, collator):
            self.data_collator, self.model, self.seen, self.logged = collator, SimpleNamespace(training=True), [], {}

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.seen.append(dict(inputs))

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            self.seen.append(dict(inputs))

        def log(self, logs, start_time=None):
            self.logged = dict(logs)

    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    trainer = trainer_class(RecordingBase, CFG, 1, deepspeed=False)(DataCollatorForLanguageModeling(pad_token_id=0))
    first = trainer.data_collator([{"input_ids": list(range(1, 40))}, {"input_ids": [1, 2, 3]}])
    second = trainer.data_collator([{"input_ids": list(range(1, 300))}])
    held_out = trainer.data_collator([{"input_ids": [1, 2]}])
    with no_host_reads():  # the per-micro-batch path: plain ints, no tensor read
        trainer.training_step(None, first)
        trainer.training_step(None, second)
        trainer.prediction_step(None, held_out, True)
    assert all(DOC_LENGTHS not in inputs for inputs in trainer.seen)
    trainer.log({"loss": 1.0})
    arch = arch_for(CFG)
    assert trainer.logged["doc_tokens"] == 39 + 3 + 299  # the held-out batch is not counted
    assert trainer.logged["useful_flops"] == pytest.approx(train_flops(arch, [39, 3, 299]))
    # attention counted per document: one 299-token document costs more than the same tokens in short ones
    assert train_flops(arch, [299]) > train_flops(arch, [100, 100, 99])
    work = UsefulWork(None)  # a model without an Arch: tokens only, no FLOPs key in the logs
    work.take({DOC_LENGTHS: (4, 5)})
    assert work.logs() == {"doc_tokens": 9}


def _rows(*points: tuple[int, float, int]) -> list[dict]:
    return [{"step": s, "time": t, "num_input_tokens_seen": n} for s, t, n in points]


def test_steady_rate_is_the_median_after_the_warmup():
    # steps 1-3 compile (slow); from step 4 on 100 tokens per second, with one stall (a checkpoint save)
    rows = _rows((1, 10.0, 100), (2, 30.0, 200), (3, 40.0, 300), (4, 41.0, 400), (5, 42.0, 500), (6, 52.0, 600))
    rows += _rows((7, 53.0, 700), (8, 54.0, 800))
    assert steady_rate(rows, "num_input_tokens_seen") == (100.0, "4-8")
    # a 3-step run has no steady part: its second half is used and named
    assert steady_rate(rows[:3], "num_input_tokens_seen") == (10.0, "2-3")
    # a resumed run's process counters restart: that interval is skipped, not a negative rate
    resumed = [{"step": s, "time": float(s), "useful_flops": f} for s, f in ((4, 10.0), (5, 20.0), (6, 5.0), (7, 15.0))]
    assert steady_rate(resumed, "useful_flops") == (10.0, "4-7")
    assert steady_rate(rows[:1], "num_input_tokens_seen") == (None, None)


def test_write_data_record_updates_the_keys_already_there(tmp_path: Path):
    point = PointPaths(tmp_path / "p000")
    write_data_record(point, {"rows_read": 10, "tokens_truncated": 700, "truncated": 1})  # e.g. a launch-time pass
    write_data_record(point, {"rows_read": 10, "truncated": 2, "train_rows": 9})  # the train stage's load
    assert json.loads(point.data_record.read_text()) == {
        "rows_read": 10,
        "tokens_truncated": 700,
        "truncated": 2,
        "train_rows": 9,
    }


def test_old_records_show_dashes_and_new_ones_every_fact():
    old = facts(None, None, {"state": "COMPLETED", "wall_s": 12.0})  # a run dir from before the run facts
    assert fact_cells(old) == ["-"] * 9
    new = facts(
        {"max_length": 8192, "train_rows": 900, "dropped_too_long": 3, "dropped_prompt_too_long": 1,
         "bad_rows_skipped": 0, "truncated": 0},
        {"tokens": 1_234_567, "steady_tok_s": 26443.2, "steady_mfu": 0.412, "peak_gpu_gib": 57.4,
         "peak_gpu_reserved_gib": 65.4, "gpus": 8},
        {"state": "COMPLETED", "wall_s": 1800.0, "peak_gpu_gib": 50.0},
    )  # fmt: skip
    assert fact_cells(new) == ["8,192", "900", "4", "0", "1,234,567", "26,443", "0.412", "57.4 (65.4 res.)", "4"]


def _local_run(root: Path) -> RunPaths:
    """A finished local launch of two points: p000 left by a train stage from before the run facts, p001 by today's."""
    run = RunPaths(root / "runs" / "lengths" / "20261207-200000")
    overrides = [["train.max_length=2048"], ["train.max_length=8192"]]
    points = [PointRecord(i, ov, f"p00{i}") for i, ov in enumerate(overrides)]
    for i in range(2):
        p = run.point(i)
        (p.root / "status").mkdir(parents=True)
        steps = [
            {"step": s, "time": 100.0 + s, "loss": 3.0 - s / 10, "num_input_tokens_seen": 1000 * s} for s in (1, 2)
        ]
        if i == 0:
            steps = [{k: v for k, v in s.items() if k != "num_input_tokens_seen"} for s in steps]
        p.metrics.write_text("".join(json.dumps(s) + "\n" for s in steps))
        p.stage_status("train").write_text(json.dumps({"state": "COMPLETED", "wall_s": 7200.0}))
    write_data_record(run.point(1), {"train_rows": 59, "dropped_too_long": 2, "truncated": 5, "tokens_truncated": 90})
    # what the launch measured (config.lengths): the length it decided for an auto point
    run.point(1).data_lengths.write_text(json.dumps({"rows": 66, "p50": 180, "max": 9000, "max_length": 8192}))
    run.point(1).train_metrics.write_text(json.dumps({"tokens": 2000, "gpus": 2, "steady_mfu": 0.5}))
    Manifest("lengths", "2026-12-07T20:00:00", "local", str(run.root), points,
             [JobRecord("train", "11,12", False, [0, 1], "slurm/train")]).save()  # fmt: skip
    return run


def test_status_and_the_report_show_each_points_facts(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from gptoss_hpc.monitor import status
    from gptoss_hpc.stages.report import build_report

    run = _local_run(tmp_path)
    assert status.main([str(run.root), "--json"]) == 0
    by_point = {p["point"]: p for p in json.loads(capsys.readouterr().out)["points"]}
    assert by_point[0]["rows_trained"] is None and by_point[0]["tok_s"] is None
    assert by_point[1]["rows_dropped"] == 2 and by_point[1]["rows_truncated"] == 5
    assert by_point[1]["gpu_hours"] == 4.0 and by_point[1]["tok_s"] == 1000.0  # from metrics.jsonl: none recorded
    assert status.main([str(run.root)]) == 0
    table = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in table.splitlines() if line.startswith(("p000", "p001"))}
    assert lines["p000"][1:] == ["train.max_length=2048", *["-"] * 9]
    assert lines["p001"][1:] == ["train.max_length=8192", "8,192", "59", "2", "5", "2,000", "1,000", "0.500", "-", "4"]

    md = build_report(run.root).read_text()
    assert "| p000 | train.max_length=2048 | - | - | - | - | - | - | - | - | - | - |" in md
    assert "| p001 | train.max_length=8192 | 8,192 | 59 | 2 | 5 | 2,000 | 1,000 | 0.500 | - | 4 | 1-2 |" in md
    report = json.loads((run.report / "report.json").read_text())
    assert report["points"][1]["facts"]["tokens_trained"] == 2000
    assert (run.report / "cost_per_point.png").read_bytes()[:4] == b"\x89PNG"
    f = point_facts(run.point(1))
    assert f["max_length"] == 8192 and f["tokens_truncated"] == 90 and f["row_tokens_max"] == 9000
