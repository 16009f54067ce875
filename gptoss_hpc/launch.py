"""Launch a gpt-oss LoRA run or sweep: compose + validate every point, then submit and return at once.

    python -m gptoss_hpc.launch experiment=demo                       # the embedded demo, local, no GPU
    python -m gptoss_hpc.launch cluster=coreweave_h200 lora.r=8        # one run on Slurm
    python -m gptoss_hpc.launch -m lora.r=8,16 train.learning_rate=1e-4,2e-4   # a sweep = one job array
    python -m gptoss_hpc.launch cluster=coreweave_h200 dry_run=true   # print configs + sbatch, submit nothing
    python -m gptoss_hpc.launch --config-dir ~/gptoss-conf cluster=mysite   # ~/gptoss-conf/cluster/mysite.yaml

Overrides use Hydra's grammar (conf/ holds the groups: cluster, model, lora, data, train, experiment).
Options: -m/--multirun (a sweep), --config-dir DIR (a folder of your own config groups, searched before
the shipped ones; repeatable), -h/--help. A dry run needs no Slurm client installed.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from gptoss_hpc import provenance
from gptoss_hpc.config.disk import disk_problems
from gptoss_hpc.config.io import dump_yaml, searchpath_override
from gptoss_hpc.errors import ConfigError, GptossHpcError
from gptoss_hpc.fileio import write_atomic
from gptoss_hpc.paths import RunPaths
from gptoss_hpc.submission import pipeline, secrets

log = logging.getLogger(__name__)

USAGE = __doc__


def _parse_argv(argv: list[str]) -> tuple[list[str], bool]:
    multirun = False
    overrides: list[str] = []
    config_dirs: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg in ("-m", "--multirun"):
            multirun = True
        elif arg == "--config-dir" or arg.startswith("--config-dir="):
            value = arg.partition("=")[2] if "=" in arg else next(args, "")
            if not value:
                raise ConfigError(["--config-dir needs a directory: --config-dir ~/gptoss-conf"])
            config_dirs.append(value)
        elif arg in ("-h", "--help"):
            print(USAGE)
            raise SystemExit(0)
        elif arg.startswith("-"):
            raise ConfigError([f"unknown option {arg!r}; options are -m/--multirun, --config-dir DIR and -h/--help"])
        else:
            overrides.append(arg)
    if config_dirs:
        overrides.insert(0, searchpath_override(config_dirs))
    return overrides, multirun


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        overrides, multirun = _parse_argv(argv)
        launch = pipeline.compose_launch(overrides, multirun=multirun)
        _print_lengths(launch)
        if launch.cfg.dry_run:
            return _dry_run(launch)
        return _launch(launch)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except GptossHpcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        # Hydra's composition errors (unknown key, missing group option) name the key already.
        from hydra.errors import HydraException

        if isinstance(exc, HydraException):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


def _print_lengths(launch: pipeline.Launch) -> None:
    """What the launch measured of the data and the train.max_length it chose, per point (one block when the
    points share it)."""
    shown: list[list[str]] = []
    for point in launch.points:
        if not point.length_lines or point.length_lines in shown:
            continue
        shown.append(point.length_lines)
        label = f"point {point.index} ({' '.join(point.overrides)}): " if launch.sweep else ""
        for line in point.length_lines:
            print(f"{label}{line}")


def _dry_run(launch: pipeline.Launch) -> int:
    cfg = launch.cfg
    run_dir = Path(cfg.run_root).expanduser().absolute() / cfg.name / "<timestamp>"
    for point in launch.points:
        title = f"point {point.index}: {' '.join(point.overrides)}" if launch.sweep else "config"
        print(f"# ===== {title} =====")
        print(dump_yaml(point.cfg))
    if cfg.cluster.backend != "slurm":
        print(f"# backend {cfg.cluster.backend!r}: stages {launch.stages} would run as local processes")
    else:
        for stage, script in pipeline.render_scripts(launch, run_dir):
            kind = f"array of {len(launch.points)}" if launch.sweep and stage != "report" else "job"
            print(f"# ===== sbatch: {stage} ({kind}) =====")
            print(script)
    if cfg.cluster.hf_home:
        from gptoss_hpc.modeling.hub import hub_resources

        repos = ", ".join(f"{what} {repo}" for what, _, repo, _, _ in hub_resources(cfg)) or "nothing (all local)"
        print(f"# a launch pre-fetches into {cfg.cluster.hf_home} before sbatch: {repos}; jobs run offline")
    for problem in disk_problems(p.cfg for p in launch.points):
        print(f"# a launch would be refused: {problem}")
    print(f"# dry run: nothing submitted ({len(launch.points)} point(s), stages {launch.stages})")
    return 0


def _launch(launch: pipeline.Launch) -> int:
    # A full disk fails late (the trainer's last save, after every step): refused before anything is written.
    # Not in compose_launch: rendering scripts (--cfg dry_run, tests) writes nothing under run_root.
    problems = disk_problems(p.cfg for p in launch.points)
    if problems:
        raise ConfigError(problems, header="not enough disk under run_root, nothing submitted")
    folders: dict[str, str] = {}
    if launch.cfg.cluster.hf_home:
        from gptoss_hpc.modeling.hub import prefetch

        folders = prefetch(launch.cfg)  # before anything is written or submitted: an unreachable repo stops here
    if any(p.unmeasured for p in launch.points):  # rows behind the Hub: measured now, before any GPU time
        pipeline.measure_pending(launch, folders)
        _print_lengths(launch)
    launch.provenance = provenance.collect()
    launch.run_dir = pipeline.make_run_dir(launch.cfg)
    pipeline.write_configs(launch)
    write_atomic(launch.run_dir / "environment.txt", "\n".join(provenance.installed_distributions()) + "\n")
    inherited = secrets.present()
    if inherited:
        log.info("jobs inherit from this shell's environment: %s (values are never written)", ", ".join(inherited))
    token_file = secrets.token_file()
    if token_file:
        log.info("Hub token: jobs read the token file %s (HF_TOKEN_PATH), not an environment variable", token_file)
    if launch.cfg.cluster.backend == "slurm":
        manifest = pipeline.submit_slurm(launch)
        _check_no_secret_written(launch.run_dir)
        _print_submitted(launch, manifest)
        return 0
    manifest, states = pipeline.run_local(launch)
    _check_no_secret_written(launch.run_dir)
    _print_local(launch, states)
    return 1 if any(s == "FAILED" for s in states.values()) else 0


def _check_no_secret_written(run_dir: Path) -> None:
    """Belt and braces: nothing this launch wrote may hold a secret's value."""
    values = secrets.values()
    if not values:
        return
    for path in run_dir.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            data = path.read_bytes()
            if any(v.encode() in data for v in values):
                raise GptossHpcError(f"a secret's value was written to {path}: delete it and report a bug")


def _print_submitted(launch: pipeline.Launch, manifest) -> None:
    from rich.console import Console
    from rich.table import Table

    paths = RunPaths(launch.run_dir)
    jobs = {j.stage: j for j in manifest.jobs}
    table = Table(title=f"{launch.cfg.name}: {len(launch.points)} point(s) submitted", show_lines=False)
    table.add_column("point")
    table.add_column("overrides")
    table.add_column("run dir")
    for stage in launch.stages:
        if stage != "report":
            table.add_column(stage)
    for p in launch.points:
        ids = [
            f"{jobs[s].job_id}_{p.index}" if jobs[s].array else jobs[s].job_id for s in launch.stages if s != "report"
        ]
        table.add_row(str(p.index), " ".join(p.overrides) or "-", str(paths.point(p.index).root), *ids)
    console = Console(soft_wrap=True)  # commands and paths must stay copy-pasteable
    console.print(table)
    for job in manifest.jobs:
        kind = f"array of {len(job.points)}" if job.array else "job"
        dep = f", after {job.dependency}" if job.dependency else ""
        console.print(f"  {job.stage:7s} {job.job_id} ({kind}{dep})  logs: {paths.root / job.log_dir}/")
    ids = ",".join(j.job_id for j in manifest.jobs)
    console.print(
        "\nWatch it:\n"
        f"  squeue -j {ids}\n"
        f"  sacct -j {ids} -X --format=JobID,JobName%30,State,Elapsed,NodeList\n"
        f"  python -m gptoss_hpc.status {paths.root}\n"
        f"  python -m gptoss_hpc.logs {paths.root} --point 0 --stage train -f\n"
        f"  python -m gptoss_hpc.cancel {paths.root}"
    )


def _print_local(launch: pipeline.Launch, states: dict[tuple[str, int], str]) -> None:
    from rich.console import Console
    from rich.table import Table

    paths = RunPaths(launch.run_dir)
    table = Table(title=f"{launch.cfg.name}: local run")
    table.add_column("point")
    table.add_column("overrides")
    table.add_column("run dir")
    stages = [s for s in launch.stages if s != "report"]
    for stage in stages:
        table.add_column(stage)
    for p in launch.points:
        row = [states.get((s, p.index), "-") for s in stages]
        table.add_row(str(p.index), " ".join(p.overrides) or "-", str(paths.point(p.index).root), *row)
    console = Console(soft_wrap=True)  # commands and paths must stay copy-pasteable
    console.print(table)
    if "report" in launch.stages:
        console.print(f"report: {states.get(('report', -1), '-')}  {paths.report}/report.md")
    console.print(f"logs: {paths.root}/slurm/<stage>/")


if __name__ == "__main__":
    sys.exit(main())
