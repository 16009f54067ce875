"""The Hub token from a file (HF_TOKEN_PATH or huggingface_hub's $HF_HOME/token), never only from HF_TOKEN."""

from __future__ import annotations

from pathlib import Path

from gptoss_hpc import secrets
from gptoss_hpc.config.io import compose, to_run_config
from gptoss_hpc.modeling.hub import should_push


def test_token_file_named_by_hf_token_path_enables_the_push(tmp_path: Path) -> None:
    cfg = to_run_config(compose(["experiment=demo"]))
    token = tmp_path / "token"
    token.write_text("hf_from_a_file_0123456789\n")
    env = {"HF_TOKEN_PATH": str(token), "HF_HOME": str(tmp_path / "empty-home")}
    assert secrets.hf_token(env) == "hf_from_a_file_0123456789"
    assert should_push(cfg, env)
    assert not should_push(cfg, {"HF_TOKEN_PATH": str(tmp_path / "missing"), "HF_HOME": str(tmp_path)})
    assert not should_push(cfg, {**env, "HF_HUB_OFFLINE": "1"})  # cluster.hf_home jobs cannot reach the Hub


def test_huggingface_hubs_own_login_file_is_found(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("hf_saved_by_hf_auth_login\n")
    assert secrets.token_file({"HF_HOME": str(tmp_path)}) == tmp_path / "token"
    assert secrets.hf_token({"HF_HOME": str(tmp_path), "HF_TOKEN": "hf_env_wins_0123"}) == "hf_env_wins_0123"


def test_huggingface_hub_reads_the_same_file(tmp_path: Path) -> None:
    """Our lookup agrees with the real client's (a fresh interpreter: it reads HF_TOKEN_PATH at import)."""
    import os
    import subprocess
    import sys

    token = tmp_path / "token"
    token.write_text("hf_agree_0123456789\n")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    probe = "import huggingface_hub; print(huggingface_hub.get_token())"
    out = subprocess.run([sys.executable, "-c", probe], env={**env, "HF_TOKEN_PATH": str(token)},
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == secrets.hf_token({"HF_TOKEN_PATH": str(token)}) == "hf_agree_0123456789"


def test_a_token_from_a_file_counts_for_the_leak_check(tmp_path: Path, monkeypatch) -> None:
    token = tmp_path / "token"
    token.write_text("hf_leak_check_0123456789\n")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN_PATH", str(token))
    assert "hf_leak_check_0123456789" in secrets.values()
