"""Compose a launch (one run or a sweep), then submit its stage DAG to Slurm or run it locally.

Slurm, a sweep of N points = at most 4 sbatch calls, whatever N:
    train  array 0..N-1 %array_parallelism
    merge  array, dependency aftercorr:<train>   (task i waits only for train task i)
    eval   array, dependency aftercorr:<merge>
    report job,   dependency afterany:<eval>     (runs when every eval ended, failed or not)
with --kill-on-invalid-dep=yes so a failed point's dependents are CANCELLED, never pending forever.
A single run uses plain jobs chained with afterok. The local backend runs the same DAG in order.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptoss_hpc.config import RunConfig, save_run_config, validate
from gptoss_hpc.config.fit import fit_to_card
from gptoss_hpc.config.io import compose_sweep, to_run_config
from gptoss_hpc.config.schema import STAGES
from gptoss_hpc.errors import ConfigError, GptossHpcError, ResourceNotReachableError, SubmissionError
from gptoss_hpc.paths import RunPaths, point_dirname
from gptoss_hpc.submission import sbatch, secrets, slurm
from gptoss_hpc.submission.executor import RenderOnlyExecutor, TaggedSlurmExecutor, job_tag
from gptoss_hpc.submission.manifest import JobRecord, Manifest, PointRecord

log = logging.getLogger(__name__)

# Keys that shape the allocation or the DAG: one array cannot vary them across its tasks.
_UNSWEEPABLE = ("cluster", "stages", "name", "run_root", "dry_run", "experiment")


@dataclass
class Point:
    index: int
    overrides: list[str]  # the swept key=value pairs that make this point (empty for a single run)
    cfg: RunConfig
    # what the launch measured of the point's data and decided for train.max_length (printed, and written to
    # pNNN/data_lengths.json)
    length_lines: list[str] = field(default_factory=list)
    length_record: dict[str, Any] = field(default_factory=dict)
    unmeasured: str | None = None  # why its rows are not measured yet: launch.py measures them or refuses
    composed: RunConfig | None = None  # as composed, before the length and the fit (measured again at launch)
    batch: list[str] = field(default_factory=list)  # every override of this point


@dataclass
class Launch:
    points: list[Point]
    sweep: bool
    run_dir: Path = field(default_factory=Path)
    # Unique per launch; tags every job (sbatch --comment) so a retried sbatch can find what it created.
    launch_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    # What code launched it (gptoss_hpc.provenance), recorded in launch.json.
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def cfg(self) -> RunConfig:
        return self.points[0].cfg

    @property
    def stages(self) -> list[str]:
        return [s for s in STAGES if s in self.cfg.stages]


def expand_overrides(overrides: Sequence[str], multirun: bool) -> tuple[list[list[str]], list[str]]:
    """Hydra's own override grammar and sweep expansion (BasicSweeper): returns (points, swept keys)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception as exc:  # Hydra's parse errors name the bad override already
        raise ConfigError([str(exc)], header="could not parse the overrides") from exc
    swept = [o.get_key_element() for o in parsed if o.is_sweep_override()]
    if swept and not multirun:
        raise ConfigError(
            [f"{k} has several values; add -m (multirun) to launch a sweep: -m {' '.join(overrides)}" for k in swept]
        )
    bad = [k for k in swept if k.split("=")[0].split(".")[0].lstrip("+~") in _UNSWEEPABLE]
    if bad:
        raise ConfigError([f"{k} cannot be swept: every task of one job array shares it" for k in bad])
    batches = BasicSweeper.split_arguments(parsed, None)[0]
    return [list(b) for b in batches], swept


def compose_launch(overrides: Sequence[str], multirun: bool = False) -> Launch:
    """Compose and validate every point before anything is submitted; one ConfigError names them all."""
    from gptoss_hpc.submission.lengths import auto_overrides

    batches, swept = expand_overrides(auto_overrides(list(overrides)), multirun)
    composed = compose_sweep(batches, swept)
    points: list[Point] = []
    problems: list[str] = []
    measured: dict[str, Any] = {}  # one measurement per distinct data + tokenizer
    for index, (batch, dcfg) in enumerate(zip(batches, composed, strict=True)):
        point = Point(index, [o for o in batch if o.split("=", 1)[0] in swept], to_run_config(dcfg), batch=batch)
        point.composed = point.cfg
        problems += _settle(point, measured, swept=bool(swept))
        points.append(point)
    problems += secrets.problems()  # malformed WANDB_API_KEY: refused here, not in every job
    if problems:
        header = f"{len(batches)}-point sweep rejected, nothing submitted" if swept else "invalid configuration"
        raise ConfigError(problems, header=header)
    # A one-value sweep is a single run (submitit submits a one-job batch as a plain job anyway).
    return Launch(points=points, sweep=len(points) > 1)


def _settle(point: Point, measured: dict[str, Any], *, swept: bool, folders: dict[str, str] | None = None) -> list[str]:
    """The point's length (its rows measured: offline while composing, with the Hub's snapshots at launch), the
    train.fit_memory setting and validation; returns its problems, each naming the point in a sweep."""
    from gptoss_hpc.submission.lengths import decide

    label = f"point {point.index} ({' '.join(point.overrides)}): " if swept else ""
    assert point.composed is not None
    try:
        lengths = decide(point.composed, point.batch, measured, offline=folders is None, folders=folders)
        if lengths.problems:
            raise ConfigError(lengths.problems)
        cfg, fitted = fit_to_card(lengths.cfg, point.batch)
        if fitted:
            log.warning("%s%s", label, fitted)
        point.cfg = validate(cfg)
    except ConfigError as exc:
        return [label + p for p in exc.problems]
    point.length_lines, point.length_record, point.unmeasured = lengths.lines, lengths.record, lengths.unmeasured
    return []


def measure_pending(launch: Launch, folders: dict[str, str]) -> None:
    """At launch, after the Hub pre-fetch: measure the points whose rows composition could not read offline (with
    the pre-fetched snapshots, else from the Hub as the jobs would), then fit and validate them again."""
    pending = [p for p in launch.points if p.unmeasured]
    if not pending:
        return
    measured: dict[str, Any] = {}
    problems: list[str] = []
    for point in pending:
        problems += _settle(point, measured, swept=launch.sweep, folders=folders)
        if point.unmeasured:
            raise ResourceNotReachableError(
                "the launch measures every training row before submitting anything (train.max_length, "
                f"data.max_length_policy), and could not read the data:\n{point.unmeasured}"
            )
    if problems:
        raise ConfigError(problems, header="rows measured at launch, nothing submitted")


def make_run_dir(cfg: RunConfig, now: dt.datetime | None = None) -> Path:
    """<run_root>/<name>/<YYYYmmdd-HHMMSS>[-k]: created exclusively, so two launches never share one."""
    stamp = (now or dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    parent = Path(cfg.run_root).expanduser().absolute() / cfg.name
    parent.mkdir(parents=True, exist_ok=True)
    for k in range(1000):
        candidate = parent / (stamp if k == 0 else f"{stamp}-{k}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise GptossHpcError(f"could not create a run dir under {parent}")


def write_configs(launch: Launch) -> list[Path]:
    import json

    from gptoss_hpc.fileio import write_atomic

    paths = RunPaths(launch.run_dir)
    save_run_config(launch.cfg, paths.config)
    written = []
    for p in launch.points:
        written.append(save_run_config(p.cfg, paths.point(p.index).config))
        if p.length_record:
            write_atomic(paths.point(p.index).data_lengths, json.dumps(p.length_record, indent=2) + "\n")
    return written


def _targets(launch: Launch, stage: str) -> list[str]:
    paths = RunPaths(launch.run_dir)
    if stage == "report":
        return [str(launch.run_dir)]
    return [str(paths.point(p.index).config) for p in launch.points]


def _is_array(launch: Launch, stage: str) -> bool:
    return launch.sweep and stage != "report"


def _shown_target(launch: Launch, stage: str) -> str:
    if _is_array(launch, stage):
        return sbatch.array_target(launch.run_dir)
    return _targets(launch, stage)[0]


def _dependency(launch: Launch, stage: str, submitted: dict[str, str]) -> str | None:
    parent = next((s for s in sbatch.PARENTS.get(stage, ()) if s in launch.stages), None)
    if parent is None or parent not in submitted:
        return None
    if stage == "report":
        return f"afterany:{submitted[parent]}"
    return f"{'aftercorr' if launch.sweep else 'afterok'}:{submitted[parent]}"


def _slurm_executor(launch: Launch, stage: str, dependency: str | None, render_only: bool = False) -> Any:
    cfg = launch.cfg
    executor = (RenderOnlyExecutor if render_only else TaggedSlurmExecutor)(
        RunPaths(launch.run_dir).slurm(stage),
        max_num_timeout=cfg.cluster.max_requeues,
        python=sbatch.python_command(cfg.cluster),
        retries=cfg.cluster.sbatch_retries,
        retry_delay_s=cfg.cluster.sbatch_retry_delay_s,
    )
    tag = job_tag(launch.launch_id, stage)
    params = sbatch.slurm_parameters(cfg, stage, target=_shown_target(launch, stage), dependency=dependency, tag=tag)
    executor.update_parameters(**params)
    return executor


def render_scripts(launch: Launch, run_dir: Path) -> list[tuple[str, str]]:
    """The exact sbatch text submitit would submit for each stage (dependencies shown as placeholders).

    Needs no Slurm client on PATH: a dry run is prepared where Slurm may not be installed.
    """
    launch.run_dir = run_dir
    launch = dataclasses.replace(launch, launch_id="<launch-id>")  # the real one is drawn at submission
    scripts = []
    placeholders = {s: f"<{s}-job-id>" for s in launch.stages}
    for stage in launch.stages:
        executor = _slurm_executor(launch, stage, _dependency(launch, stage, placeholders), render_only=True)
        if _is_array(launch, stage):
            executor.parameters["map_count"] = len(launch.points)
        text = executor._make_submission_file_text(executor._submitit_command_str, "dry-run")
        scripts.append((stage, text))
    return scripts


def submit_slurm(launch: Launch) -> Manifest:
    """At most one sbatch per stage. On a failure, cancel what this launch already submitted and say so."""
    from gptoss_hpc.submission.jobs import stage_callable

    manifest = _new_manifest(launch, "slurm")
    submitted: dict[str, str] = {}
    for stage in launch.stages:
        dependency = _dependency(launch, stage, submitted)
        try:
            executor = _slurm_executor(launch, stage, dependency)
            fn = stage_callable(stage)
            targets = _targets(launch, stage)
            if _is_array(launch, stage):
                with executor.batch():
                    jobs = [executor.submit(fn, t) for t in targets]
                job_id = jobs[0].job_id.split("_")[0]
            else:
                job_id = executor.submit(fn, targets[0]).job_id
        except Exception as exc:
            cancelled = _cancel(list(submitted.values()))
            done = ", ".join(f"{s} {j}" for s, j in submitted.items()) or "none"
            raise SubmissionError(
                f"submitting the {stage} stage failed: {_error_text(exc)}\n"
                f"already submitted by this launch: {done}; {cancelled}\n"
                f"run dir (configs kept): {launch.run_dir}"
            ) from exc
        submitted[stage] = job_id
        manifest.jobs.append(
            JobRecord(
                stage=stage,
                job_id=job_id,
                array=_is_array(launch, stage),
                points=[p.index for p in launch.points] if stage != "report" else [],
                log_dir=str(RunPaths(launch.run_dir).slurm(stage).relative_to(launch.run_dir)),
                dependency=dependency,
                job_name=sbatch.job_name(launch.cfg, stage),
            )
        )
        manifest.save()
    return manifest


def run_local(launch: Launch) -> tuple[Manifest, dict[tuple[str, int], str]]:
    """The same DAG as local processes through submitit's LocalExecutor, in order, blocking.

    A failed stage stops only that point's later stages; the report runs if any point got that far.
    Returns the manifest and the final state of every (stage, point).
    """
    if "serve" in launch.stages:
        raise ConfigError(
            ["stages has serve on the local backend, where it never returns; run "
             "`python -m gptoss_hpc.serve RUN_DIR/p000/merged` instead"]
        )  # fmt: skip
    manifest = _new_manifest(launch, "local")
    manifest.save()  # status can see the launch while its first stage runs
    states: dict[tuple[str, int], str] = {}
    failed: set[int] = set()
    with _job_environment(sbatch.job_env(launch.cfg.cluster)):
        _run_local_stages(launch, manifest, states, failed)
    return manifest, states


@contextmanager
def _job_environment(env: dict[str, str]) -> Iterator[None]:
    """Local jobs inherit this process's environment: give them what an sbatch script would export."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_local_stages(launch: Launch, manifest: Manifest, states: dict[tuple[str, int], str], failed: set[int]) -> None:
    import submitit

    from gptoss_hpc.submission.jobs import stage_callable

    for stage in launch.stages:
        executor = submitit.LocalExecutor(folder=RunPaths(launch.run_dir).slurm(stage))
        executor.update_parameters(**sbatch.local_parameters(launch.cfg, stage))
        indices = [-1] if stage == "report" else [p.index for p in launch.points]
        ids: list[str] = []
        for index, target in zip(indices, _targets(launch, stage), strict=True):
            if index in failed:
                states[(stage, index)] = "CANCELLED"
                continue
            job = executor.submit(stage_callable(stage), target)
            ids.append(str(job.job_id))
            log.info("local %s job %s started for %s", stage, job.job_id, target)
            try:
                job.results()  # every task: a train job runs one per GPU (result() refuses several)
                states[(stage, index)] = "COMPLETED"
            except Exception as exc:
                states[(stage, index)] = "FAILED"
                failed.add(index)
                log.error("%s failed for %s: %s", stage, target, _error_text(exc))
        manifest.jobs.append(
            JobRecord(
                stage=stage,
                job_id=",".join(ids),
                array=False,
                points=[] if stage == "report" else [p.index for p in launch.points],
                log_dir=str(RunPaths(launch.run_dir).slurm(stage).relative_to(launch.run_dir)),
                job_name=sbatch.job_name(launch.cfg, stage),
            )
        )
        manifest.save()


def _new_manifest(launch: Launch, backend: str) -> Manifest:
    return Manifest(
        name=launch.cfg.name,
        created=dt.datetime.now().isoformat(timespec="seconds"),
        backend=backend,
        run_dir=str(launch.run_dir),
        points=[PointRecord(p.index, p.overrides, point_dirname(p.index)) for p in launch.points],
        launch_id=launch.launch_id,
        provenance=launch.provenance,
    )


def _cancel(job_ids: list[str]) -> str:
    if not job_ids:
        return "nothing to cancel"
    try:
        slurm.scancel(job_ids)
    except (OSError, slurm.SlurmError) as exc:
        return f"could NOT cancel them ({_error_text(exc)}): run `scancel {' '.join(job_ids)}`"
    return f"cancelled them (scancel {' '.join(job_ids)})"


def _error_text(exc: BaseException) -> str:
    stderr = getattr(exc, "stderr", None)
    if isinstance(stderr, bytes):
        stderr = stderr.decode(errors="replace")
    text = str(exc).strip()
    if stderr and stderr.strip() not in text:
        text += f"\nstderr: {stderr.strip()}"
    return text
