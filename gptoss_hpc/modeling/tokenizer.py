"""Tokenizers: the model's own (Hub or path), the real gpt-oss tokenizer built offline, or a tiny BPE.

``model.tokenizer``:
    "auto"      AutoTokenizer.from_pretrained(model.name_or_path, revision)
    "offline"   o200k_base (from the bpe-openai package, see gptoss_hpc.modeling.vocab) + the Harmony special tokens
                at ids 199998..201087 = the 201,088-token gpt-oss tokenizer, with no Hub access
    "tiny-bpe"  a ~3k BPE trained deterministically on the bundled sample + the same special tokens
    <path>      AutoTokenizer.from_pretrained(path)

Both built tokenizers carry our gpt-oss chat template (gptoss_hpc.modeling.chat_template: TRL's training
variant with ``{% generation %}`` marks, rendering the developer message as openai-harmony does), pad
<|endoftext|>, eos <|return|>, bos <|startoftext|> as gpt-oss ships them, and are cached under
``gptoss_hpc.modeling.vocab.cache_root()/tokenizers/`` (built in a temp dir, then renamed). A Hub/path tokenizer
that carries the released gpt-oss template gets ours instead; any other template is left as it is.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from gptoss_hpc.config.schema import ModelConfig
from gptoss_hpc.errors import GptossHpcError
from gptoss_hpc.modeling.chat_template import gptoss_chat_template, is_gptoss_template
from gptoss_hpc.modeling.hub import is_local, unreachable
from gptoss_hpc.modeling.vocab import O200K_FILE, cache_root, o200k_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# o200k_base's pre-tokenizer regex (tiktoken_ext.openai_public.o200k_base).
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
# The named gpt-oss/Harmony special tokens; every other id in FIRST..LAST is <|reserved_N|>.
# 200018 is <|endofprompt|> as in o200k_base and the tokenizer openai/gpt-oss-* ship (openai-harmony
# calls it <|reserved_200018|>); openai-harmony also knows <|reserved_201088|>, outside gpt-oss's vocab.
NAMED_SPECIAL = {
    199998: "<|startoftext|>",
    199999: "<|endoftext|>",
    200002: "<|return|>",
    200003: "<|constrain|>",
    200005: "<|channel|>",
    200006: "<|start|>",
    200007: "<|end|>",
    200008: "<|message|>",
    200012: "<|call|>",
    200018: "<|endofprompt|>",
}
FIRST_SPECIAL, LAST_SPECIAL = 199998, 201087
GPT_OSS_VOCAB_SIZE = LAST_SPECIAL + 1  # 201,088
BOS, EOS, PAD = "<|startoftext|>", "<|return|>", "<|endoftext|>"
TINY_BPE_VOCAB = 3000
_BUILD_VERSION = "1"
_FALLBACK_TEXT = """\
The quick brown fox jumps over the lazy dog. Explain why the sky is blue in one sentence.
Rayleigh scattering makes shorter wavelengths of sunlight scatter more in the atmosphere.
Quelle est la capitale de la France ? La capitale de la France est Paris.
Wie spät ist es? Es ist drei Uhr nachmittags. ¿Cuántos días tiene una semana? Siete días.
Let me think step by step: 12 * 7 = 84, and 84 + 16 = 100. The answer is 100.
def add(a, b):\n    return a + b\nprint(add(2, 3))  # 5
"""


def special_tokens() -> list[str]:
    """The gpt-oss special tokens in id order (199998..201087)."""
    return [NAMED_SPECIAL.get(i, f"<|reserved_{i}|>") for i in range(FIRST_SPECIAL, LAST_SPECIAL + 1)]


def load_tokenizer(model_cfg: ModelConfig) -> PreTrainedTokenizerBase:
    kind = model_cfg.tokenizer
    if kind == "offline":
        tok = _load_cached(cache_root() / "tokenizers" / "gpt-oss-offline", _build_offline)
    elif kind == "tiny-bpe":
        text = _tiny_training_text()
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        tok = _load_cached(cache_root() / "tokenizers" / f"tiny-bpe-{digest}", lambda d: _build_tiny_bpe(d, text))
    else:
        name = model_cfg.name_or_path if kind == "auto" else kind
        revision = model_cfg.revision if kind == "auto" else None
        tok = _from_pretrained(name, revision, model_cfg.trust_remote_code)
        if is_gptoss_template(tok.chat_template):
            log.info("tokenizer %s: the released gpt-oss chat template replaced by gptoss_hpc's (Harmony)", name)
            tok.chat_template = gptoss_chat_template()
        elif _other_gptoss_template(tok.chat_template):
            log.warning(
                "tokenizer %s carries a gpt-oss chat template that is not the released one: kept as it is, "
                'so its renders are not the ones checked against openai-harmony (README "Data")',
                name,
            )
    if tok.pad_token is None:
        tok.pad_token = PAD if PAD in tok.get_vocab() else tok.eos_token
    return tok


def _other_gptoss_template(template: object) -> bool:
    """A Harmony-looking template that is neither the released one nor ours (a user's own edit)."""
    return (
        isinstance(template, str) and "<|channel|>final<|message|>" in template and template != gptoss_chat_template()
    )


def _from_pretrained(name: str, revision: str | None, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as exc:
        if is_local(name):
            raise GptossHpcError(f"tokenizer at {name} could not be loaded: {exc}") from exc
        raise unreachable(
            "tokenizer",
            name,
            revision,
            exc,
            "export HF_TOKEN for gated/private repos, pre-download it and set model.tokenizer=<local path>, "
            "or use model.tokenizer=offline (the gpt-oss tokenizer built without the Hub)",
        ) from exc


def _load_cached(target: Path, build) -> PreTrainedTokenizerBase:
    from transformers import PreTrainedTokenizerFast

    marker = target / "gptoss_hpc_build.json"
    if not marker.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
        try:
            build(tmp)
            (tmp / marker.name).write_text(json.dumps({"version": _BUILD_VERSION}) + "\n")
            try:
                os.rename(tmp, target)
                log.info("built tokenizer cache %s", target)
            except OSError:  # another process finished first (or a stale dir without a marker)
                if not marker.is_file():
                    shutil.rmtree(target, ignore_errors=True)
                    os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    tok = PreTrainedTokenizerFast.from_pretrained(str(target))
    tok.chat_template = gptoss_chat_template()
    return tok


def _wrap_and_save(tokenizer_object, out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_object,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )
    tok.chat_template = gptoss_chat_template()
    tok.save_pretrained(str(out))


def _read_tiktoken(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _build_offline(out: Path) -> None:
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab_file = o200k_dir() / O200K_FILE

    class _Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:  # no tiktoken package needed
            return _read_tiktoken(Path(tiktoken_url))

    tok = _Converter(vocab_file=str(vocab_file), pattern=O200K_PATTERN).converted()
    if tok.get_vocab_size() != FIRST_SPECIAL:
        raise GptossHpcError(f"o200k_base has {tok.get_vocab_size()} tokens, expected {FIRST_SPECIAL}")
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special_tokens()])
    if tok.get_vocab_size() != GPT_OSS_VOCAB_SIZE:
        raise GptossHpcError(f"offline gpt-oss tokenizer has {tok.get_vocab_size()} ids, not {GPT_OSS_VOCAB_SIZE}")
    _wrap_and_save(tok, out)


def _build_tiny_bpe(out: Path, text: str) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_BPE_VOCAB,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(text.splitlines(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special_tokens()])
    _wrap_and_save(tok, out)


def _tiny_training_text() -> str:
    """The bundled sample's text (sorted files, file order), else a built-in paragraph."""
    sample = Path(__file__).resolve().parents[1] / "data" / "sample"
    parts: list[str] = []
    for f in sorted(sample.glob("*.jsonl")) if sample.is_dir() else []:
        for line in f.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            parts.extend(_row_text(row))
    return "\n".join(parts) if parts else _FALLBACK_TEXT


def _row_text(row: object) -> list[str]:
    out: list[str] = []
    if isinstance(row, dict):
        for value in row.values():
            out.extend(_row_text(value))
    elif isinstance(row, list):
        for value in row:
            out.extend(_row_text(value))
    elif isinstance(row, str):
        out.append(row)
    return out
