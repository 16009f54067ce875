"""Shared fixtures.

`local_slurm` starts (or reuses) the real one-node Slurm from `launchers/local_slurm.sh` once per session
and sets SLURM_CONF. Every test marked `@pytest.mark.slurm` gets it automatically. If Slurm cannot
start, those tests FAIL: a Slurm test must never pass or skip silently.

`local_slurm_2node` starts (or reuses) the 2-node cluster (`local_slurm.sh start --nodes 2`: own dir, ports
7817-7819, MariaDB 7317, bridge 10.200.0.0/24) on demand, once per session, and points SLURM_CONF at it for
the test only, so one-node and 2-node tests share a session. Tests marked `@pytest.mark.slurm2` get it
automatically. If this session started it, it is stopped at the session's end; one that was already up
(a developer's) is left running for the next run.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCAL_SLURM = REPO_ROOT / "launchers" / "local_slurm.sh"
EXPORT_PREFIX = "export SLURM_CONF="
NODES2 = ["--nodes", "2"]


def _start(args: list[str]) -> Path:
    """`bash local_slurm.sh <args>` and the slurm.conf its last stdout line exports; pytest.fail otherwise."""
    try:
        proc = subprocess.run(
            ["bash", str(LOCAL_SLURM), *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=600,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{LOCAL_SLURM} start did not finish in {exc.timeout} s:\n{exc.stderr or ''}")
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not lines[-1].startswith(EXPORT_PREFIX):
        pytest.fail(
            f"local Slurm did not start: `bash {LOCAL_SLURM} {' '.join(args)}` exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    conf = Path(lines[-1].removeprefix(EXPORT_PREFIX).strip())
    if not conf.is_file():
        pytest.fail(f"{LOCAL_SLURM} start printed {lines[-1]!r}, but {conf} does not exist")
    return conf


@pytest.fixture(scope="session")
def local_slurm() -> Path:
    """Path of the running local cluster's slurm.conf (also exported as SLURM_CONF)."""
    conf = _start(["start"])
    os.environ["SLURM_CONF"] = str(conf)
    return conf


@pytest.fixture(scope="session")
def _local_slurm_2node_session() -> Iterator[Path]:
    # status before start: was it already up (a developer's instance, left running) or ours to stop?
    was_up = (
        subprocess.run(
            ["bash", str(LOCAL_SLURM), "status", *NODES2], capture_output=True, stdin=subprocess.DEVNULL, timeout=60
        ).returncode
        == 0
    )
    conf = _start(["start", *NODES2])
    yield conf
    if not was_up:
        subprocess.run(
            ["bash", str(LOCAL_SLURM), "stop", *NODES2], capture_output=True, stdin=subprocess.DEVNULL, timeout=120
        )


@pytest.fixture
def local_slurm_2node(_local_slurm_2node_session: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """slurm.conf of the 2-node local cluster (node1, node2: own hostnames and addresses), exported as
    SLURM_CONF for this test only (later one-node tests get theirs back)."""
    monkeypatch.setenv("SLURM_CONF", str(_local_slurm_2node_session))
    return _local_slurm_2node_session


@pytest.fixture(autouse=True)
def _slurm_marker_needs_cluster(request: pytest.FixtureRequest) -> None:
    """Tests marked `slurm` (`slurm2`) get the running one-node (2-node) cluster without asking for it."""
    slurm2 = request.node.get_closest_marker("slurm2") is not None or "local_slurm_2node" in request.fixturenames
    slurm = not slurm2 and (
        request.node.get_closest_marker("slurm") is not None or "local_slurm" in request.fixturenames
    )
    module = request.node.nodeid.split("::")[0]
    if os.environ.get("PYTEST_XDIST_WORKER") and (slurm or slurm2):
        group = _xdist_group(module)
        if group != ("slurm2" if slurm2 else "slurm"):  # it would share its cluster with another worker's tests
            pytest.fail(f"{module} uses a local cluster but is in xdist group {group!r}: see _xdist_group")
    if slurm2:
        request.getfixturevalue("local_slurm_2node")
    elif slurm:
        request.getfixturevalue("local_slurm")


# --------------------------------------------------------------------------------------- pytest-xdist
# `make test` runs two pytest-xdist workers (-n 2 --dist loadgroup). Every test module that touches a local
# cluster goes to that cluster's group ("slurm", "slurm2"), which one worker runs in order, so each cluster sees
# one test at a time as in a serial run (GPU indices, pending reasons, the 2-node cluster's stop at the end of
# the session that started it); every other module is a group of its own, so a module-scoped fixture is built
# once. The grouping is done here, by a scheduler, not with xdist_group marks: xdist 3.8's loadgroup writes the
# group into item._nodeid, which pytest 9 no longer reads, so the marks are silently ignored.
_SLURM2 = re.compile(r"mark\.slurm2\b|\blocal_slurm_2node\b")
# the marker, or the fixture by name (not `cluster=local_slurm`, a config, nor launchers/local_slurm.sh)
_SLURM = re.compile(r"mark\.slurm\b|(?<![=/])\blocal_slurm\b(?![.\w])")


@functools.cache
def _xdist_group(module: str) -> str:
    """The group of a test module (its path from the rootdir): "slurm2", "slurm" or the module itself. Read from
    the source, as the xdist controller collects nothing: a module naming the marker or the fixture is in."""
    text = (REPO_ROOT / module).read_text()
    if _SLURM2.search(text):
        return "slurm2"
    return "slurm" if _SLURM.search(text) else module


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ClusterGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _xdist_group(nodeid.split("::")[0])

    return ClusterGroups(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In an xdist worker, the two cluster groups first: they take the longest, so they are handed out first
    (with --no-loadscope-reorder). A serial run keeps pytest's order."""
    if hasattr(config, "workerinput"):
        first = {"slurm2": 0, "slurm": 1}
        items.sort(key=lambda item: first.get(_xdist_group(item.nodeid.split("::")[0]), 2))
