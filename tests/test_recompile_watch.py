"""The train stage's recompile watch (gptoss_hpc.modeling.trainer.recompile_watch_callback), with real torch.compile
(the "eager" backend: dynamo's guards and graph counting are the GPU's, without a C++ toolchain) and transformers'
real TrainerState/TrainerControl. The H200 bug it reports: a static-shape compiled region fed a new packed length at
steps 9, 10 and 14 of a 16-step run (docs/BENCHMARKS.md, 2026-11-30, 2e6274a)."""

from __future__ import annotations

import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from gptoss_hpc.modeling.trainer import compiled_graphs, recompile_watch_callback


def _run(lengths_per_step: list[int], start_step: int = 0, step_fn=None) -> list[str]:
    warned: list[str] = []
    cb = recompile_watch_callback(warned.append, warmup_steps=2)
    f = step_fn or torch.compile(lambda x: (x * 2).sum(), dynamic=False, backend="eager")
    args = TrainingArguments(output_dir="/tmp/unused-recompile-watch", report_to=[])
    state, control = TrainerState(), TrainerControl()
    state.global_step = start_step
    for n in lengths_per_step:
        f(torch.ones(n + start_step))  # a fresh shape family per test: dynamo's cache is per code object
        state.global_step += 1
        cb.on_step_end(args, state, control)
    cb.on_train_end(args, state, control)
    return warned


def test_new_shapes_after_the_warm_up_are_reported_once_with_their_steps():
    before = compiled_graphs()
    warned = _run([1000, 1001, 1000, 1000, 1002, 1000, 1003])
    assert compiled_graphs() - before >= 4  # 1000, 1001 (warm-up), 1002, 1003: real compiles were counted
    assert len(warned) == 1, warned
    assert "compiled 2 graph(s) after the first 2 optimizer steps (in steps 5, 7)" in warned[0]
    assert "train.pad_to_multiple_of" in warned[0]


def test_one_shape_after_the_warm_up_is_quiet():
    assert _run([2000, 2001, 2000, 2001, 2000, 2000]) == []


def test_a_resumed_run_gets_its_own_warm_up():
    # resumed at step 100: its first compiles are warm-up, not recompiles
    assert _run([3000, 3001, 3000, 3001], start_step=100) == []


def test_graph_breaks_in_compiled_regions_are_reported():
    import contextvars

    from gptoss_hpc.modeling.trainer import graph_breaks

    var = contextvars.ContextVar("collector", default=None)  # what transformers' output-capturing hooks read

    def layer(x):
        x = x * 2
        var.get()
        return x.sum()

    f = torch.compile(layer, dynamic=False, backend="eager")
    before = sum(graph_breaks().values())
    warned = _run([5000, 5000, 5000], step_fn=f)
    assert sum(graph_breaks().values()) > before  # a real break, counted by dynamo
    assert len(warned) == 1 and "graph break" in warned[0] and "TORCH_LOGS=graph_breaks" in warned[0], warned
    # breaks from before the callback existed (another training in this process) are not this run's
    assert _run([6000, 6000, 6000]) == []
