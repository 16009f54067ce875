"""train.extra: any other trl.SFTConfig field, passed through to a real SFTConfig and checked at launch
(unknown names refused with close matches, fields a key of ours sets refused with that key)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from gptoss_hpc.config import compose, to_run_config, validate
from gptoss_hpc.config.sft_extra import OWNED_FIELDS
from gptoss_hpc.errors import ConfigError
from gptoss_hpc.modeling.sft import build_sft_config_kwargs
from gptoss_hpc.paths import PointPaths

REPO = Path(__file__).resolve().parents[1]


def test_an_extra_field_reaches_sftconfig(tmp_path: Path) -> None:
    from trl import SFTConfig

    cfg = validate(to_run_config(compose(["experiment=demo", "+train.extra.neftune_noise_alpha=5"])))
    kwargs = build_sft_config_kwargs(cfg, PointPaths(tmp_path / "p000"), env={})
    assert kwargs["neftune_noise_alpha"] == 5
    assert SFTConfig(**kwargs).neftune_noise_alpha == 5


def test_unknown_and_owned_names_are_refused_together() -> None:
    cfg = to_run_config(
        compose(["experiment=demo", "+train.extra.neftune_noise_alpa=5", "+train.extra.learning_rate=1.0"])
    )
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    text = str(err.value)
    assert "train.extra.neftune_noise_alpa: not a field of trl.SFTConfig; did you mean neftune_noise_alpha" in text
    assert "train.extra.learning_rate: SFTConfig's learning_rate is set by gptoss_hpc; use train.learning_rate" in text


def test_every_owned_field_is_what_we_set_and_a_real_sftconfig_field(tmp_path: Path) -> None:
    """OWNED_FIELDS covers every kwarg build_sft_config_kwargs sets, and names only real SFTConfig fields
    (warmup_ratio: gone in transformers 5, kept so that it still points at train.warmup_ratio)."""
    from trl import SFTConfig

    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    cfg = to_run_config(compose(["experiment=demo", "train.deepspeed=true"]))
    assert set(build_sft_config_kwargs(cfg, PointPaths(tmp_path / "p000"), env={})) <= set(OWNED_FIELDS)
    assert set(OWNED_FIELDS) - fields <= {"warmup_ratio"}


def test_launch_refuses_a_misspelt_extra(tmp_path: Path) -> None:
    """What a user sees: `gptoss-hpc launch` exits non-zero naming the key and the fix, and submits nothing."""
    proc = subprocess.run(
        [sys.executable, "-m", "gptoss_hpc.cli", "launch", "experiment=demo", "+train.extra.max_seq_lenght=8",
         f"run_root={tmp_path}", "dry_run=true"],
        cwd=REPO, capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "train.extra.max_seq_lenght: not a field of trl.SFTConfig" in proc.stderr
    assert not any(tmp_path.rglob("launch.json"))
