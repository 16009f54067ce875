"""Tokenizers: the offline gpt-oss tokenizer matches openai-harmony id for id; tiny-bpe carries the same
special tokens and template; Hub failures become one ResourceNotReachableError (the Hub is unreachable
from CI for real: HF_HUB_OFFLINE makes it fail fast instead of retrying)."""

from __future__ import annotations

import pytest

from gptoss_hpc.config.schema import ModelConfig
from gptoss_hpc.errors import ResourceNotReachableError
from gptoss_hpc.modeling.tokenizer import (
    GPT_OSS_VOCAB_SIZE,
    NAMED_SPECIAL,
    gptoss_chat_template,
    load_tokenizer,
    special_tokens,
)

STRINGS = [
    "Hello, world!",
    "  multiple   spaces\n\nand newlines\r\n\tTabs",
    "Ünïcødé 日本語のテキスト 🙂 émojis — Привет, мир! مرحبا",
    "x = 12345678 + 3.14159; don't I'll WE'VE they're",
    "<|start|>user<|message|>What is 2+2?<|end|><|start|>assistant<|channel|>analysis<|message|>"
    "Simple.<|end|><|start|>assistant<|channel|>final<|message|>4<|return|>",
    "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>"
    '{"city": "Paris"}<|call|>',
    "<|startoftext|><|endoftext|><|reserved_200000|><|reserved_200001|><|reserved_201087|>",
    "def f(a, b):\n    return a ** b  # comment\n\n\n",
]


@pytest.fixture(scope="module")
def offline():
    return load_tokenizer(ModelConfig(tokenizer="offline"))


@pytest.fixture(scope="module")
def harmony():
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding

    from gptoss_hpc.modeling.vocab import use_offline_harmony_vocab

    use_offline_harmony_vocab()
    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)


def test_offline_tokenizer_matches_openai_harmony(offline, harmony):
    assert len(offline) == GPT_OSS_VOCAB_SIZE == 201088
    for text in STRINGS:
        ours = offline.encode(text, add_special_tokens=False)
        assert ours == harmony.encode(text, allowed_special="all"), text
        assert offline.decode(ours) == text


def test_offline_special_tokens_have_harmony_ids(offline, harmony):
    # 200018: <|endofprompt|> in o200k_base and openai/gpt-oss-*; harmony names it <|reserved_200018|>.
    for token in harmony.special_tokens_set:
        (hid,) = harmony.encode(token, allowed_special="all")
        if hid in (200018, 201088):  # 201088 is outside gpt-oss's 201,088-token vocab
            continue
        assert offline.convert_tokens_to_ids(token) == hid, token
    for tid, token in NAMED_SPECIAL.items():
        assert offline.convert_tokens_to_ids(token) == tid
    assert (offline.eos_token, offline.pad_token, offline.bos_token) == (
        "<|return|>",
        "<|endoftext|>",
        "<|startoftext|>",
    )
    assert offline.eos_token_id == 200002 and offline.pad_token_id == 199999


def test_offline_chat_template_renders_harmony(offline, harmony):
    assert offline.chat_template == gptoss_chat_template()
    messages = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4", "thinking": "Simple arithmetic."},
    ]
    ids = offline.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    # The official template prints today's date: compare structure, not a fixed string.
    tail = "<|start|>user<|message|>What is 2+2?<|end|><|start|>assistant<|channel|>analysis<|message|>"
    tail += "Simple arithmetic.<|end|><|start|>assistant<|channel|>final<|message|>4<|return|>"
    assert ids[-len(harmony.encode(tail, allowed_special="all")) :] == harmony.encode(tail, allowed_special="all")
    assert ids[0] == 200006 and ids[-1] == 200002


def test_tiny_bpe_is_small_deterministic_and_has_harmony_specials(tmp_path, monkeypatch):
    a = load_tokenizer(ModelConfig(tokenizer="tiny-bpe"))
    monkeypatch.setenv("GPTOSS_HPC_CACHE", str(tmp_path))  # a fresh build gives the same vocabulary
    b = load_tokenizer(ModelConfig(tokenizer="tiny-bpe"))
    assert a.get_vocab() == b.get_vocab()
    assert 2000 < len(a) < 5000
    specials = special_tokens()
    assert len(specials) == 1090
    ids = [a.convert_tokens_to_ids(t) for t in specials]
    assert ids == list(range(ids[0], ids[0] + len(specials)))
    assert a.eos_token == "<|return|>" and a.pad_token == "<|endoftext|>"
    assert a.chat_template == gptoss_chat_template()
    text = "<|start|>user<|message|>Hola, ¿qué tal?<|end|>"
    enc = a.encode(text, add_special_tokens=False)
    assert enc[0] == a.convert_tokens_to_ids("<|start|>") and a.decode(enc) == text


def test_hub_tokenizer_unreachable_names_the_fix(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(ResourceNotReachableError) as err:
        load_tokenizer(ModelConfig(name_or_path="openai/gpt-oss-does-not-exist", tokenizer="auto"))
    msg = str(err.value)
    assert "openai/gpt-oss-does-not-exist" in msg and "HF_TOKEN" in msg and "model.tokenizer=offline" in msg


def test_local_tokenizer_path(tmp_path, offline):
    offline.save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(ModelConfig(tokenizer=str(tmp_path / "tok")))
    assert tok.encode(STRINGS[0], add_special_tokens=False) == offline.encode(STRINGS[0], add_special_tokens=False)


def test_a_saved_tokenizer_with_the_released_template_gets_ours(tmp_path, offline, caplog):
    from gptoss_hpc.modeling.chat_template import released_gptoss_template

    offline.chat_template = released_gptoss_template()  # as openai/gpt-oss-* ship it
    offline.save_pretrained(tmp_path / "released")
    offline.chat_template = gptoss_chat_template().replace("Reasoning: ", "Effort: ")  # a user's own edit
    offline.save_pretrained(tmp_path / "edited")
    offline.chat_template = gptoss_chat_template()
    assert load_tokenizer(ModelConfig(tokenizer=str(tmp_path / "released"))).chat_template == gptoss_chat_template()
    with caplog.at_level("WARNING", logger="gptoss_hpc.modeling.tokenizer"):
        edited = load_tokenizer(ModelConfig(tokenizer=str(tmp_path / "edited")))
    assert "Effort: " in edited.chat_template and "not the released one" in caplog.text
