"""Site YAML cannot inject into job scripts; goldens of every rendered field; a dry run needs no Slurm.

Hostile values are given as a user's own site file (`--config-dir DIR` with DIR/cluster/hostile.yaml), the
way a site config reaches the launcher.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from gptoss_hpc import launch as launch_cli
from gptoss_hpc.config import validate
from gptoss_hpc.config.io import searchpath_override
from gptoss_hpc.errors import ConfigError
from gptoss_hpc.submission import backends, pipeline

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"
SITE_CONF = GOLDEN / "conf"
BASE = {"defaults": ["base_cluster"], "backend": "slurm", "accelerator": "gpu", "partition": "gpu"}
M = "MARKER"  # replaced by a file path per test: the payloads try to create it

# (what a hostile site file sets, the key the refusal must name). Each would add a command or an sbatch
# option to every job script if rendered as given.
HOSTILE: list[tuple[dict, str]] = [
    ({"env": {f"X=1; touch {M}; Y": "1"}}, "cluster.env key 'X=1; touch"),
    ({"env": {"A B": "1"}}, "cluster.env key 'A B'"),
    ({"env": {"1ABC": "1"}}, "cluster.env key '1ABC'"),
    ({"env": {f"$(touch {M})": "1"}}, "cluster.env key '$(touch"),
    ({"env": {"FOO": f"ok\ntouch {M}"}}, "cluster.env.FOO contains a control character"),
    ({"env": {"FOO": "a\rb"}}, "cluster.env.FOO contains a control character"),
    ({"env": {"FOO": "a\x00b"}}, "cluster.env.FOO contains a control character"),
    ({"sbatch_extra": {"reservation": f"r1\ntouch {M}"}}, "cluster.sbatch_extra.reservation contains a control"),
    ({"sbatch_extra": {"reservation": f"r1'; touch {M}; '"}}, "cluster.sbatch_extra.reservation"),
    ({"sbatch_extra": {"job_name": "x"}}, "cluster.sbatch_extra.job_name is set by gptoss_hpc"),
    ({"sbatch_extra": {"export": "NONE"}}, "cluster.sbatch_extra.export is set by gptoss_hpc"),
    ({"sbatch_extra": {"signal": "B:USR1@60"}}, "cluster.sbatch_extra.signal is set by gptoss_hpc"),
    ({"sbatch_extra": {"open-mode": "truncate"}}, "cluster.sbatch_extra.open-mode is set by gptoss_hpc"),
    ({"sbatch_extra": {"comment": "x"}}, "cluster.sbatch_extra.comment is set by gptoss_hpc"),
    ({"sbatch_extra": {"dep": "afterok:1"}}, "cluster.sbatch_extra.dep is not an sbatch option"),
    ({"sbatch_extra": {f"wrap=touch {M} #": "x"}}, "cluster.sbatch_extra key 'wrap=touch"),
    ({"partition": f"gpu\n#SBATCH --wrap=touch {M}"}, "cluster.partition contains a control character"),
    ({"account": f"a' ; touch {M} #"}, "cluster.account"),
    ({"qos": "normal\x00"}, "cluster.qos contains a control character"),
    ({"setup": [f"module load x\ntouch {M}"]}, "cluster.setup[0] contains a control character"),
    ({"container": {"kind": "apptainer", "image": f"a.sif\ntouch {M}"}}, "cluster.container.image contains"),
    ({"container": {"kind": "apptainer", "image": "a.sif", "extra_args": [f"--nv\ntouch {M}"]}},
     "cluster.container.extra_args[0] contains"),
    ({"container": {"kind": "pyxis", "image": "i", "mounts": [f"/d:/d\ntouch {M}"]}},
     "cluster.container.mounts[0] contains"),
    ({"container": {"kind": "pyxis", "image": "i", "mounts": ["/a:/a,/etc:/etc"]}},
     "cluster.container.mounts[0] '/a:/a,/etc:/etc' holds ','"),
]  # fmt: skip


def _site_dir(tmp_path: Path, fields: dict, marker: Path) -> Path:
    text = json.dumps({**BASE, **fields}).replace(M, str(marker))  # JSON is YAML; keeps \r and \x00 escaped
    cluster = tmp_path / "site" / "cluster"
    cluster.mkdir(parents=True)
    (cluster / "hostile.yaml").write_text(text)
    return tmp_path / "site"


@pytest.mark.parametrize(
    ("fields", "key"), HOSTILE, ids=[k.split(" ")[0] + f"-{i}" for i, (_, k) in enumerate(HOSTILE)]
)
def test_hostile_site_value_is_refused_by_the_dry_run(
    fields: dict, key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "pwned"
    site = _site_dir(tmp_path, fields, marker)
    rc = launch_cli.main(["--config-dir", str(site), "cluster=hostile", "dry_run=true", f"run_root={tmp_path}/logs"])
    out, err = capsys.readouterr()
    assert rc == 2, out + err
    assert key.replace(M, str(marker)) in err
    assert "#SBATCH" not in out and "touch" not in out  # no script printed, nothing injected
    assert not marker.exists()


def test_hostile_run_root_is_refused() -> None:
    # Hydra's override grammar refuses a newline on the command line already; a config file can still hold one.
    cfg = pipeline.compose_launch(["cluster=coreweave_h200"]).cfg
    cfg.run_root = "logs\ntouch x"
    with pytest.raises(ConfigError, match="run_root contains a control character"):
        validate(cfg)


def _scripts(cluster: str, tmp_path: Path, sweep: bool = False) -> list[tuple[str, str]]:
    overrides = [searchpath_override([SITE_CONF]), f"cluster={cluster}", "name=golden"]
    launch_ = pipeline.compose_launch([*overrides, "lora.r=8,16"] if sweep else overrides, multirun=sweep)
    return backends.render_scripts(launch_, tmp_path / "logs" / "golden" / "20261125-000000")


def test_shell_syntax_in_env_values_and_container_args_stays_inert(tmp_path: Path) -> None:
    """Accepted values with `$(...)` and backticks are quoted: running the script's setup creates nothing."""
    train = dict(_scripts("apptainer", tmp_path))["train"]
    setup = train.split("# setup\n")[1].split("\n# command")[0].replace("module load cuda/12.8", "")
    result = subprocess.run(["bash", "-c", f"set -eu\n{setup}\nprintf %s \"$EXTRA_FLAGS\""], capture_output=True,
                            text=True, cwd=tmp_path, check=True)  # fmt: skip
    assert result.stdout == "--a b $(not run) `nor this`"
    srun_line = next(line for line in train.splitlines() if line.startswith("srun "))
    argv = shlex.split(srun_line)
    assert "--env=X=$(not run)" in argv and "/images/gpt oss.sif" in argv and "--bind=/data dir:/data" in argv


def _normalise(text: str, run_dir: Path) -> str:
    return text.replace(str(run_dir), "<RUN_DIR>").replace(sys.executable, "<PYTHON>").replace("'<PYTHON>'", "<PYTHON>")


@pytest.mark.parametrize("cluster", ["apptainer", "pyxis", "site_extras"])
def test_golden_site_scripts(cluster: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no-token"))  # the rendered env must not depend on ~
    monkeypatch.delenv("HF_TOKEN", raising=False)
    scripts = _scripts(cluster, tmp_path, sweep=cluster == "pyxis")
    text = "\n".join(f"##### {stage}\n{script}" for stage, script in scripts)
    text = _normalise(text, tmp_path / "logs" / "golden" / "20261125-000000")
    golden = GOLDEN / f"site_{cluster}.sbatch"
    if os.environ.get("GPTOSS_HPC_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()


def test_hf_home_names_the_token_file_not_the_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = tmp_path / "hf-token"
    token.write_text("hf_abcdefghijklmnop\n")
    monkeypatch.setenv("HF_TOKEN_PATH", str(token))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    train = dict(_scripts("site_extras", tmp_path))["train"]
    assert f"export HF_TOKEN_PATH={token}" in train
    assert "export HF_HUB_OFFLINE=1" in train and "export HF_HOME='/shared/hf cache'" in train
    assert "hf_abcdefghijklmnop" not in train


def _path_without_slurm(tmp_path: Path) -> Path:
    """A PATH folder of symlinks to /usr/bin and /bin minus every Slurm client (Slurm IS installed here)."""
    slurm = {"srun", "sbatch", "squeue", "sacct", "scontrol", "scancel", "sinfo", "salloc", "sattach", "sstat"}
    bin_dir = tmp_path / "bin-no-slurm"
    bin_dir.mkdir()
    for folder in (Path("/usr/bin"), Path("/bin")):
        for entry in folder.iterdir():
            if entry.name not in slurm and not (bin_dir / entry.name).exists():
                (bin_dir / entry.name).symlink_to(entry)
    return bin_dir


def test_dry_run_without_any_slurm_client_prints_the_same_script(tmp_path: Path) -> None:
    bin_dir = _path_without_slurm(tmp_path)
    cmd = [sys.executable, "-m", "gptoss_hpc.launch", "cluster=coreweave_h200", "dry_run=true"]
    bare = subprocess.run(["env", "-i", f"PATH={bin_dir}", f"PYTHONPATH={REPO}", *cmd],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)  # fmt: skip
    assert subprocess.run(["env", "-i", f"PATH={bin_dir}", "sh", "-c", "command -v srun sbatch"]).returncode != 0
    assert bare.returncode == 0, bare.stderr
    assert "#SBATCH --partition=h200-low" in bare.stdout and "srun --unbuffered" in bare.stdout
    with_slurm = subprocess.run(["env", "-i", "PATH=/usr/bin:/bin", f"PYTHONPATH={REPO}", *cmd],
                                capture_output=True, text=True, cwd=tmp_path, timeout=300)  # fmt: skip
    assert with_slurm.returncode == 0, with_slurm.stderr
    assert bare.stdout == with_slurm.stdout


def test_config_dir_must_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = launch_cli.main(["--config-dir", str(tmp_path / "nope"), "dry_run=true"])
    assert rc == 2
    assert "--config-dir" in capsys.readouterr().err
