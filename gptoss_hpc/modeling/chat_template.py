"""The gpt-oss chat template our tokenizers carry: TRL's gpt-oss training template, rendering as openai-harmony.

Two differences from the template openai/gpt-oss-* ship (which TRL copies as ``gptoss.jinja``):

- ``{% generation %}`` marks around assistant output, exactly as TRL's ``gptoss_training.jinja`` (TRL would
  swap that file in for ``assistant_only_loss`` only when a tokenizer's template equals ``gptoss.jinja``
  character for character; carrying the marks ourselves makes the match unnecessary: TRL uses a template
  that already has them as it is).
- No ``\\n\\n`` between the developer instructions and ``<|end|>`` when there are no tools. openai-harmony
  (0.0.8, ``render_developer_content``: sections joined by ``"\\n\\n"``), its test-data
  (``test_simple_convo_medium_effort.txt``: ``...like a robot.<|end|>``) and the OpenAI cookbook render it
  without; the released template adds one token there, so a Harmony-based server (vLLM) would see prompts
  one token different from the ones we train and evaluate on. With tools the blank line stays (it separates
  ``# Instructions`` from ``# Tools``, as in Harmony).

Inference ignores the generation marks (transformers renders them as nothing).
"""

from __future__ import annotations

import functools

from gptoss_hpc.errors import GptossHpcError

_RELEASED_DEVELOPER_BLOCK = """        {{- developer_message }}
        {{- "\\n\\n" }}
    {%- endif %}"""
_HARMONY_DEVELOPER_BLOCK = """        {{- developer_message }}
        {%- if tools %}
            {{- "\\n\\n" }}
        {%- endif %}
    {%- endif %}"""


def released_gptoss_template() -> str:
    """The template openai/gpt-oss-* ship (TRL's verbatim copy, the one TRL's string match looks for)."""
    from trl.chat_template_utils import gptoss_chat_template

    return gptoss_chat_template


@functools.lru_cache(maxsize=1)
def gptoss_chat_template() -> str:
    """TRL's gpt-oss training template (generation marks) with Harmony's developer message ending."""
    from trl.chat_template_utils import gptoss_training_chat_template as template

    if template.count(_RELEASED_DEVELOPER_BLOCK) != 1:
        raise GptossHpcError(
            "TRL's gptoss_training.jinja no longer has the developer block this project patches (see "
            "gptoss_hpc/modeling/chat_template.py); pin trl to the version in pyproject.toml or update the patch"
        )
    return template.replace(_RELEASED_DEVELOPER_BLOCK, _HARMONY_DEVELOPER_BLOCK)


def is_gptoss_template(template: object) -> bool:
    """The released gpt-oss template or TRL's training variant of it (both get replaced by ours)."""
    from trl.chat_template_utils import gptoss_chat_template as released
    from trl.chat_template_utils import gptoss_training_chat_template as training

    return isinstance(template, str) and template in (released, training)
