"""Submit a composed launch's stage DAG: one backend per scheduler behind one small interface.

``backend_for(cfg, stage_callable)`` picks the backend named by ``cluster.backend``; the launcher calls only
``dry_run(launch, run_dir)`` (what it would submit, as text) and ``run(launch)`` (submit, or run, and the
manifest). ``stage_callable`` maps a stage to the callable its job runs (gptoss_hpc.stages.jobs): the launcher
hands it in, so submission never imports the stages it submits. A new scheduler is a new ``Backend`` subclass
in ``BACKENDS``.

Slurm, a sweep of N points = at most 4 sbatch calls, whatever N:
    train  array 0..N-1 %array_parallelism
    merge  array, dependency aftercorr:<train>   (task i waits only for train task i)
    eval   array, dependency aftercorr:<merge>
    report job,   dependency afterany:<eval>     (runs when every eval ended, failed or not)
with --kill-on-invalid-dep=yes so a failed point's dependents are CANCELLED, never pending forever.
A single run uses plain jobs chained with afterok. The local backend runs the same DAG in order.
"""

from __future__ import annotations

import abc
import dataclasses
import datetime as dt
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

from gptoss_hpc import slurm
from gptoss_hpc.config.schema import ClusterConfig
from gptoss_hpc.errors import ConfigError, SubmissionError
from gptoss_hpc.paths import RunPaths, point_dirname
from gptoss_hpc.submission import sbatch
from gptoss_hpc.submission.executor import RenderOnlyExecutor, TaggedSlurmExecutor, job_tag
from gptoss_hpc.submission.manifest import JobRecord, Manifest, PointRecord
from gptoss_hpc.submission.pipeline import Launch

log = logging.getLogger(__name__)

# stage -> the callable its job runs (gptoss_hpc.stages.jobs.stage_callable, handed in by the launcher)
JobFactory = Callable[[str], Callable[[str], Any]]


@dataclass
class Outcome:
    manifest: Manifest
    # the final state of every (stage, point index; -1 for the report) when the backend ran the DAG to its end
    # (local); None when the jobs run on after the launcher returns (Slurm)
    states: dict[tuple[str, int], str] | None = None


class Backend(abc.ABC):
    name: ClassVar[str]

    def __init__(self, stage_callable: JobFactory) -> None:
        self.stage_callable = stage_callable

    @abc.abstractmethod
    def dry_run(self, launch: Launch, run_dir: Any) -> list[str]:
        """What ``run`` would submit, as text blocks to print; submits nothing and writes nothing."""

    @abc.abstractmethod
    def run(self, launch: Launch) -> Outcome:
        """Submit (or run) every stage of the launch; launch.json records each job as it goes."""


def backend_for(cluster: ClusterConfig, stage_callable: JobFactory) -> Backend:
    return BACKENDS[cluster.backend](stage_callable)


def _targets(launch: Launch, stage: str) -> list[str]:
    paths = RunPaths(launch.run_dir)
    if stage == "report":
        return [str(launch.run_dir)]
    return [str(paths.point(p.index).config) for p in launch.points]


def _is_array(launch: Launch, stage: str) -> bool:
    return launch.sweep and stage != "report"


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


def _record(
    launch: Launch, manifest: Manifest, stage: str, job_id: str, *, array: bool, dependency: str | None
) -> None:
    """The one job-record writer: append the stage's job to launch.json and save it."""
    manifest.jobs.append(
        JobRecord(
            stage=stage,
            job_id=job_id,
            array=array,
            points=[p.index for p in launch.points] if stage != "report" else [],
            log_dir=str(RunPaths(launch.run_dir).slurm(stage).relative_to(launch.run_dir)),
            dependency=dependency,
            job_name=sbatch.job_name(launch.cfg, stage),
        )
    )
    manifest.save()


def _error_text(exc: BaseException) -> str:
    stderr = getattr(exc, "stderr", None)
    if isinstance(stderr, bytes):
        stderr = stderr.decode(errors="replace")
    text = str(exc).strip()
    if stderr and stderr.strip() not in text:
        text += f"\nstderr: {stderr.strip()}"
    return text


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


def render_scripts(launch: Launch, run_dir: Any) -> list[tuple[str, str]]:
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


# stage -> the callable its job runs (gptoss_hpc.stages.jobs.stage_callable, handed in by the launcher)
JobFactory = Callable[[str], Callable[[str], Any]]


class SlurmBackend(Backend):
    """sbatch through submitit: at most one sbatch per stage; returns once everything is queued."""

    name = "slurm"

    def dry_run(self, launch: Launch, run_dir: Any) -> list[str]:
        blocks = []
        for stage, script in render_scripts(launch, run_dir):
            kind = f"array of {len(launch.points)}" if _is_array(launch, stage) else "job"
            blocks.append(f"# ===== sbatch: {stage} ({kind}) =====\n{script}")
        return blocks

    def run(self, launch: Launch) -> Outcome:
        """On a failure, cancel what this launch already submitted and say so."""
        manifest = _new_manifest(launch, "slurm")
        submitted: dict[str, str] = {}
        for stage in launch.stages:
            dependency = _dependency(launch, stage, submitted)
            try:
                executor = _slurm_executor(launch, stage, dependency)
                fn = self.stage_callable(stage)
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
            _record(launch, manifest, stage, job_id, array=_is_array(launch, stage), dependency=dependency)
        return Outcome(manifest)


def _cancel(job_ids: list[str]) -> str:
    if not job_ids:
        return "nothing to cancel"
    try:
        slurm.scancel(job_ids)
    except (OSError, slurm.SlurmError) as exc:
        return f"could NOT cancel them ({_error_text(exc)}): run `scancel {' '.join(job_ids)}`"
    return f"cancelled them (scancel {' '.join(job_ids)})"


class LocalBackend(Backend):
    """The same DAG as local processes through submitit's LocalExecutor, in order, blocking. A failed stage
    stops only that point's later stages; the report runs if any point got that far."""

    name = "local"

    def dry_run(self, launch: Launch, run_dir: Any) -> list[str]:
        return [f"# backend {self.name!r}: stages {launch.stages} would run as local processes"]

    def run(self, launch: Launch) -> Outcome:
        if "serve" in launch.stages:
            raise ConfigError(
                ["stages has serve on the local backend, where it never returns; run "
                 "`python -m gptoss_hpc.serve RUN_DIR/p000/merged` instead"]
            )  # fmt: skip
        manifest = _new_manifest(launch, "local")
        manifest.save()  # status can see the launch while its first stage runs
        states: dict[tuple[str, int], str] = {}
        with _job_environment(sbatch.job_env(launch.cfg.cluster)):
            self._run_stages(launch, manifest, states)
        return Outcome(manifest, states)

    def _run_stages(self, launch: Launch, manifest: Manifest, states: dict[tuple[str, int], str]) -> None:
        import submitit

        failed: set[int] = set()
        for stage in launch.stages:
            executor = submitit.LocalExecutor(folder=RunPaths(launch.run_dir).slurm(stage))
            executor.update_parameters(**sbatch.local_parameters(launch.cfg, stage))
            indices = [-1] if stage == "report" else [p.index for p in launch.points]
            ids: list[str] = []
            for index, target in zip(indices, _targets(launch, stage), strict=True):
                if index in failed:
                    states[(stage, index)] = "CANCELLED"
                    continue
                job = executor.submit(self.stage_callable(stage), target)
                ids.append(str(job.job_id))
                log.info("local %s job %s started for %s", stage, job.job_id, target)
                try:
                    job.results()  # every task: a train job runs one per GPU (result() refuses several)
                    states[(stage, index)] = "COMPLETED"
                except Exception as exc:
                    states[(stage, index)] = "FAILED"
                    failed.add(index)
                    log.error("%s failed for %s: %s", stage, target, _error_text(exc))
            _record(launch, manifest, stage, ",".join(ids), array=False, dependency=None)


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


BACKENDS: dict[str, type[Backend]] = {"slurm": SlurmBackend, "local": LocalBackend}
