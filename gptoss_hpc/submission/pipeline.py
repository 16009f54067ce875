"""Compose a launch (one run or a sweep): every point validated, its run directory and config files written.
Submitting its stage DAG is the backends' (gptoss_hpc.submission.backends).
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptoss_hpc import secrets
from gptoss_hpc.config import RunConfig, save_run_config, validate
from gptoss_hpc.config.fit import fit_to_card
from gptoss_hpc.config.io import compose_sweep, to_run_config
from gptoss_hpc.config.schema import STAGES
from gptoss_hpc.errors import ConfigError, GptossHpcError, ResourceNotReachableError
from gptoss_hpc.paths import RunPaths

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
