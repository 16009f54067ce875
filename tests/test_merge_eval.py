"""Merge and eval stages on a tiny gpt-oss (tiny-bpe tokenizer) with a LoRA adapter whose lora_B is
non-zero, saved to disk as the train stage would: real files, real models, CPU only. Nothing is faked."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from gptoss_hpc.config import compose, save_run_config, to_run_config
from gptoss_hpc.modeling.harmony import (
    ParsedCompletion,
    adheres,
    detect_language,
    format_validity,
    language_adherence,
    parse_completion,
    requested_language,
)
from gptoss_hpc.paths import PointPaths

GERMAN_ANALYSIS = (
    "Der Benutzer fragt nach der Hauptstadt von Australien. Viele denken an Sydney, aber die Hauptstadt "
    "ist Canberra. Ich antworte kurz auf Spanisch."
)
SPANISH_ANALYSIS = (
    "El usuario pregunta por la capital de Australia. Mucha gente piensa en Sídney, pero la capital es "
    "Canberra. Respondo brevemente."
)


def harmony(analysis: str | None, final: str | None, end: str = "<|return|>") -> str:
    parts = []
    if analysis is not None:
        parts.append(f"<|channel|>analysis<|message|>{analysis}<|end|>")
    if final is not None:
        prefix = "<|start|>assistant" if parts else ""
        parts.append(f"{prefix}<|channel|>final<|message|>{final}{end}")
    return "".join(parts)


# --- metric functions on hand-written completions ----------------------------------------------------


def test_parse_valid_completion_splits_channels():
    p = parse_completion(harmony(GERMAN_ANALYSIS, "La capital de Australia es Canberra."))
    assert p.valid and p.error is None
    assert p.analysis == GERMAN_ANALYSIS
    assert p.final == "La capital de Australia es Canberra."


@pytest.mark.parametrize(
    "text",
    [
        "Canberra.",  # plain text, no Harmony at all
        harmony(GERMAN_ANALYSIS, None),  # analysis only: no final channel
        "<|channel|>final<|message|>Canberra<|return|><|endoftext|>",  # junk after the stop token
        "",
    ],
)
def test_parse_invalid_completions_do_not_raise(text):
    p = parse_completion(text)
    assert not p.valid
    assert p.final is None
    assert p.error


def test_format_validity_and_adherence_on_hand_written_completions():
    completions = [
        harmony(GERMAN_ANALYSIS, "Canberra."),  # valid, German analysis
        harmony(SPANISH_ANALYSIS, "Canberra."),  # valid, Spanish analysis
        harmony(None, "Canberra."),  # valid, no analysis at all
        "not harmony",  # invalid
    ]
    parsed = [parse_completion(c) for c in completions]
    assert format_validity(parsed) == pytest.approx(3 / 4)
    assert detect_language(GERMAN_ANALYSIS) == "de"
    assert detect_language(SPANISH_ANALYSIS) == "es"
    assert adheres(parsed[0], "German") and not adheres(parsed[1], "German") and adheres(parsed[1], "es")
    # all four asked for German: only the first adheres
    assert language_adherence(parsed, ["German"] * 4) == pytest.approx(1 / 4)
    # prompts that requested no language are left out of the denominator
    assert language_adherence(parsed, ["German", "Spanish", None, None]) == pytest.approx(1.0)
    assert language_adherence(parsed, [None] * 4) is None
    assert format_validity([]) is None


def test_requested_language_from_system_line():
    msgs = [{"role": "system", "content": "reasoning language: German"}, {"role": "user", "content": "hi"}]
    assert requested_language(msgs) == "German"
    assert requested_language([{"role": "user", "content": "reasoning language: French"}]) is None


def test_summarize_counts():
    from gptoss_hpc.stages.eval import Prompt, score_completion, summarize

    prompt = Prompt("p", [{"role": "user", "content": "x"}], "German")
    records = [
        score_completion(prompt, parse_completion(harmony(GERMAN_ANALYSIS, "Canberra.")), "finetuned"),
        score_completion(prompt, ParsedCompletion(text="junk"), "finetuned"),
    ]
    s = summarize(records)
    assert s["format_validity"] == 0.5 and s["language_adherence"] == 0.5
    assert (s["generations"], s["valid"], s["with_requested_language"], s["adherent"]) == (2, 1, 2, 1)


# --- the stages on a tiny model -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_point(tmp_path_factory) -> PointPaths:
    """A point dir as the train stage leaves it: config.yaml, base/, adapter/ (adapter + tokenizer),
    metrics.jsonl, train_metrics.json. The adapter's lora_B is random (non-zero), so merging matters."""
    import torch
    from peft import get_peft_model

    from gptoss_hpc.modeling.lora import build_lora_config
    from gptoss_hpc.modeling.model import load_base_model
    from gptoss_hpc.modeling.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("run")
    cfg = to_run_config(
        compose(
            [
                "experiment=demo",
                "model.tokenizer=tiny-bpe",
                f"run_root={root}",
                "lora.target_modules=[q_proj,v_proj]",  # experts (target_parameters) and attention LoRA
                "eval.max_new_tokens=12",
                "eval.max_eval_rows=4",
                "eval.prompts=[{system: 'reasoning language: French', user: 'Bonjour ?'}]",
            ]
        )
    )
    paths = PointPaths(root / "p000")
    save_run_config(cfg, paths.config)
    tokenizer = load_tokenizer(cfg.model)
    base = load_base_model(cfg, paths, for_training=True)
    model = get_peft_model(base, build_lora_config(cfg))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    model.save_pretrained(str(paths.adapter))
    tokenizer.save_pretrained(str(paths.adapter))
    paths.metrics.write_text(
        "".join(json.dumps({"step": s, "loss": 5.0 - s, "learning_rate": 1e-3}) + "\n" for s in (1, 2))
    )
    paths.train_metrics.write_text(json.dumps({"train_loss": 4.5, "train_runtime": 1.0}) + "\n")
    return paths


@pytest.fixture(scope="module")
def merged_point(trained_point: PointPaths) -> PointPaths:
    from gptoss_hpc.stages import merge

    merge.main(trained_point.config)
    return trained_point


@pytest.mark.slow
def test_merged_model_reproduces_adapter_logits(merged_point: PointPaths):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = merged_point
    check = json.loads((paths.merged / "merge_check.json").read_text())
    assert check["passed"] and check["max_abs_diff"] <= check["tolerance"]
    assert check["adapter_effect_max_abs"] > 100 * check["tolerance"]  # the adapter really changes logits
    assert json.loads(paths.stage_status("merge").read_text())["state"] == "COMPLETED"
    assert list(paths.merged.glob("*.safetensors"))
    card = (paths.merged / "README.md").read_text()
    assert "base_model: tiny-gpt-oss" in card and '"train_loss": 4.5' in card and '"r": 8' in card

    # a plain from_pretrained, no PEFT, no gptoss_hpc
    merged = AutoModelForCausalLM.from_pretrained(str(paths.merged)).eval()
    tok = AutoTokenizer.from_pretrained(str(paths.merged))
    base = AutoModelForCausalLM.from_pretrained(str(paths.base)).eval()
    with_adapter = PeftModel.from_pretrained(base, str(paths.adapter)).eval()
    ids = tok.apply_chat_template(
        [{"role": "system", "content": "reasoning language: German"}, {"role": "user", "content": "Wie heißt du?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        a = with_adapter(input_ids=ids).logits
        m = merged(input_ids=ids).logits
        with with_adapter.disable_adapter():
            b = with_adapter(input_ids=ids).logits
    diff = float((a - m).abs().max())
    print(f"merged vs base+adapter max |logit diff| = {diff:.3g}; base vs adapter = {float((a - b).abs().max()):.3g}")
    assert diff < 1e-4
    assert float((a - b).abs().max()) > 1e-2


@pytest.mark.slow
def test_merge_fails_above_tolerance(trained_point: PointPaths, monkeypatch):
    from gptoss_hpc.modeling import merge_check
    from gptoss_hpc.stages import merge

    monkeypatch.setitem(merge_check.TOLERANCES, "float32", (-1.0, 0.0))  # nothing can pass a negative tolerance
    with pytest.raises(merge.MergeError, match="tolerance"):
        merge.body(*_cfg_paths(trained_point))


def _cfg_paths(paths: PointPaths):
    from gptoss_hpc.config import load_run_config

    return load_run_config(paths.config), paths


def test_hub_push_needs_token_flag_and_env(trained_point: PointPaths):
    from gptoss_hpc.modeling.hub import should_push

    cfg, _ = _cfg_paths(trained_point)
    cfg.train.push_to_hub = True
    assert not should_push(cfg, {})
    assert should_push(cfg, {"HF_TOKEN": "x"})
    assert not should_push(cfg, {"HF_TOKEN": "x", "PUSH_TO_HUB": "false"})
    cfg.train.push_to_hub = False
    assert not should_push(cfg, {"HF_TOKEN": "x"})


def test_hub_repo_names(trained_point: PointPaths):
    from gptoss_hpc.modeling.hub import HubPushError, hub_repo_id

    cfg, paths = _cfg_paths(trained_point)
    cfg.train.hub_model_id = None
    assert hub_repo_id(cfg, paths, {"HF_USER": "alice"}, suffix="-merged") == "alice/demo-p000-merged"
    assert hub_repo_id(cfg, paths, {}, whoami=lambda: "bob", suffix="-merged") == "bob/demo-p000-merged"
    with pytest.raises(HubPushError, match="HF_USER"):
        hub_repo_id(cfg, paths, {})
    cfg.train.hub_model_id = "org/gptoss-demo"
    assert hub_repo_id(cfg, paths, {}, suffix="-merged") == "org/gptoss-demo-merged"  # one point: no point suffix


@pytest.mark.slow
def test_eval_writes_both_models_loss_and_metrics(merged_point: PointPaths):
    from gptoss_hpc.stages import eval as eval_stage

    paths = merged_point
    eval_stage.main(paths.config)
    result = json.loads((paths.eval / "eval.json").read_text())
    for tag in ("base", "finetuned"):
        r = result[tag]
        assert r["loss"] is not None and math.isfinite(r["loss"]) and r["loss"] > 0
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
        assert 0 < r["rows"] <= 4 and r["tokens"] > 0
        assert 0.0 <= r["format_validity"] <= 1.0
        assert 0.0 <= r["language_adherence"] <= 1.0
        assert r["generations"] == result["prompts"] and r["with_requested_language"] == result["prompts"]
    # the adapter changes the model, so the two losses differ
    assert result["base"]["loss"] != pytest.approx(result["finetuned"]["loss"])
    assert result["eval_loss"] == result["finetuned"]["loss"]
    print("eval.json:", json.dumps({k: result[k] for k in ("base", "finetuned")}, indent=1))

    records = [json.loads(line) for line in (paths.eval / "generations.jsonl").read_text().splitlines()]
    assert len(records) == 2 * result["prompts"]
    ids = [r["prompt_id"] for r in records if r["model"] == "finetuned"]
    assert ids[0] == "default-0" and ids[-1] == "config-0"
    first = records[0]
    assert first["messages"] == [
        {"role": "system", "content": "reasoning language: German"},
        {"role": "user", "content": "¿Cuál es el capital de Australia?"},
    ]
    assert first["requested_language"] == "German"
    # one prompt per reasoning language of the bundled sample
    data_langs = {r["requested_language"] for r in records if r["prompt_id"].startswith("data-")}
    assert len(data_langs) >= 2
    assert json.loads(paths.stage_status("eval").read_text())["state"] == "COMPLETED"


def test_eval_without_merged_model_fails_with_status(tmp_path: Path):
    from gptoss_hpc.stages import eval as eval_stage

    cfg = to_run_config(compose(["experiment=demo", "model.tokenizer=tiny-bpe", f"run_root={tmp_path}"]))
    paths = PointPaths(tmp_path / "p000")
    save_run_config(cfg, paths.config)
    with pytest.raises(eval_stage.EvalError, match="no merged model"):
        eval_stage.main(paths.config)
    status = json.loads(paths.stage_status("eval").read_text())
    assert status["state"] == "FAILED" and "no merged model" in status["error"]


def _bf16_adapter_model(paths: PointPaths):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(paths.base), dtype=torch.bfloat16)
    return PeftModel.from_pretrained(base, str(paths.adapter)).eval()


def _probe():
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 3000, (48,), generator=g).tolist() for _ in range(2)]


@pytest.mark.slow
def test_bf16_merge_check_uses_rounding_noise_and_restores_weights(trained_point: PointPaths):
    import torch

    from gptoss_hpc.modeling.merge_check import adapted_parameters, merge_and_check, probe_logits, rounding_noise

    model = _bf16_adapter_model(trained_point)
    targets = adapted_parameters(model)
    assert len(targets) == 8  # q_proj/v_proj and experts gate_up_proj/down_proj, both layers
    merged, check = merge_and_check(model, _probe(), "bfloat16")
    print("bf16 merge check:", json.dumps(check))
    assert check["passed"] and check["rounding_noise_max_abs"] > 0
    assert check["mean_abs_diff"] <= check["mean_tolerance"]
    assert check["conclusive"]
    # the check can tell a lost adapter (merged == base) apart from rounding
    assert check["adapter_effect_mean_abs"] > 5 * check["mean_tolerance"]
    before = probe_logits(merged, _probe())
    rounding_noise(merged, targets, _probe())
    after = probe_logits(merged, _probe())
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.slow
def test_bf16_merge_check_catches_a_lost_adapter(trained_point: PointPaths):
    from gptoss_hpc.modeling.merge_check import MergeError, merge_and_check

    model = _bf16_adapter_model(trained_point)
    model.merge_and_unload = model.unload  # a broken merge: drops the adapter instead of folding it in
    with pytest.raises(MergeError, match="tolerance") as err:
        merge_and_check(model, _probe(), "bfloat16")
    check = err.value.check
    assert check is not None and not check["passed"]
    assert check["mean_abs_diff"] > 5 * check["mean_tolerance"]


def test_heldout_loss_over_kept_logits_in_chunks_equals_the_full_logits_loss(trained_point: PointPaths, monkeypatch):
    """eval keeps only the predicted positions' logits (logits_to_keep) and takes the fp32 loss in chunks; that is
    the same number as cross-entropy over the whole row's logits (what it computed before, ~3.8 GiB per 2k row)."""
    import torch
    from peft import PeftModel

    from gptoss_hpc.config import load_run_config
    from gptoss_hpc.data import load_datasets
    from gptoss_hpc.modeling.model import load_base_model
    from gptoss_hpc.modeling.tokenizer import load_tokenizer
    from gptoss_hpc.stages import eval as eval_stage

    cfg = load_run_config(trained_point.config)
    tokenizer = load_tokenizer(cfg.model)
    model = PeftModel.from_pretrained(load_base_model(cfg, trained_point, for_training=False), trained_point.adapter)
    train, heldout = load_datasets(cfg, tokenizer)
    rows = [r["messages"] for r in (heldout or train).select(range(3))]  # as the eval stage picks them
    monkeypatch.setattr(eval_stage, "LOSS_CHUNK", 7)  # several chunks per row, and a ragged last one
    got = eval_stage.heldout_loss(model, tokenizer, rows, cfg.train.max_length)

    total, tokens = 0.0, 0
    with torch.inference_mode():
        for messages in rows:
            item = eval_stage.assistant_labels(tokenizer, messages, cfg.train.max_length)
            if item is None:
                continue
            ids, labels = item
            y = torch.tensor(labels[1:])
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            total += float(
                torch.nn.functional.cross_entropy(logits, y, ignore_index=eval_stage.IGNORE, reduction="sum")
            )
            tokens += int((y != eval_stage.IGNORE).sum())
    assert got["tokens"] == tokens > 7 and got["rows"] > 0
    assert got["loss"] == pytest.approx(total / tokens, rel=1e-5)
