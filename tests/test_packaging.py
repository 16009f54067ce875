"""A non-editable `pip install .` in a fresh venv runs the dry run and the demo; launch.json names the code.

Real: pip, setuptools (the wheel built from this tree), a fresh venv, the launcher, the demo's stages as
local processes. To keep it offline and fast the fresh venv sees the shared venv's packages through a .pth
line (plain path: the shared venv's own editable gptoss_hpc hook is not run), and pip installs only this
package (--no-deps --no-build-isolation --no-index).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from gptoss_hpc import provenance

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GPTOSS_HPC_CONF", "VIRTUAL_ENV")}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of a fresh venv holding a non-editable install of this tree."""
    root = tmp_path_factory.mktemp("pkg")
    src = root / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split("\n")  # fmt: skip
    for name in filter(None, files):
        if (REPO / name).is_file() and not name.startswith(("tests/", "docs/")):
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((REPO / name).read_bytes())
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root).stdout.strip()
    )
    (site / "shared-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", str(src)],
               root)  # fmt: skip
    assert pip.returncode == 0, pip.stderr
    return python


def test_the_installed_package_is_the_wheel_with_its_config_tree(installed: Path, tmp_path: Path) -> None:
    probe = "import gptoss_hpc, gptoss_hpc.config.io as io; print(gptoss_hpc.__file__); print(io.conf_dir())"
    out = _run([str(installed), "-c", probe], tmp_path)
    assert out.returncode == 0, out.stderr
    package, conf = out.stdout.split()
    venv = installed.parent.parent
    assert Path(package).is_relative_to(venv), package  # not the repo, not the shared venv's editable install
    assert Path(conf) == Path(package).parent / "conf"
    assert (Path(conf) / "cluster" / "coreweave_h200.yaml").is_file()


def test_installed_dry_run_prints_the_sbatch(installed: Path, tmp_path: Path) -> None:
    out = _run([str(installed), "-m", "gptoss_hpc.launch", "cluster=coreweave_h200", "dry_run=true"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "#SBATCH --partition=h200-low" in out.stdout and "submitit.core._submit" in out.stdout


@pytest.mark.slow
def test_installed_demo_runs_with_a_user_config_dir_and_records_provenance(installed: Path, tmp_path: Path) -> None:
    # The demo, shortened (small tokenizer, 2 steps), with an experiment from a user's own config dir.
    user = tmp_path / "my-conf" / "experiment"
    user.mkdir(parents=True)
    (user / "quick.yaml").write_text(
        "# @package _global_\ndefaults:\n  - demo\nname: quick\nmodel:\n  tokenizer: tiny-bpe\n"
        "train:\n  max_steps: 2\n  max_length: 256\neval:\n  max_new_tokens: 4\n  max_eval_rows: 2\n"
    )
    out = _run([str(installed), "-m", "gptoss_hpc.launch", "--config-dir", str(tmp_path / "my-conf"),
                "experiment=quick", f"run_root={tmp_path}/logs"], tmp_path, timeout=900)  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    (run_dir,) = (tmp_path / "logs").glob("quick/*")
    manifest = json.loads((run_dir / "launch.json").read_text())
    assert [j["stage"] for j in manifest["jobs"]] == ["train", "merge", "eval", "report"]
    assert (run_dir / "report" / "report.md").is_file()
    prov = manifest["provenance"]
    assert prov["package_version"] == "0.1.0"
    assert prov["git_sha"] is None  # an installed copy is no checkout of ours
    freeze = (run_dir / "environment.txt").read_text().splitlines()
    assert any(line.startswith("gptoss_hpc==") for line in freeze)
    import hashlib

    assert prov["freeze_sha256"] == hashlib.sha256("\n".join(freeze).encode()).hexdigest()


def test_source_checkout_records_its_git_commit() -> None:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, check=True, capture_output=True, text=True)
    assert provenance.collect()["git_sha"] == head.stdout.strip()
