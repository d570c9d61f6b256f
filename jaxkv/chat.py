"""Chat prompts: a model's Jinja chat template, rendered as transformers renders it.

``ChatTemplate(source, bos_token=..., eos_token=...)`` renders a list of ``{"role", "content"}``
messages with ``jinja2``'s sandbox, the same options transformers uses (``trim_blocks``,
``lstrip_blocks``, ``raise_exception``, ``tojson``), so a template written for transformers gives
the same text here. The rendered text already holds the template's special tokens: encode it
with ``add_special_tokens=False``. ``end_of_turn_ids`` finds the token the template closes an
assistant turn with (``<|im_end|>``, ``<|eot_id|>``, ...), where generation should stop.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Sequence

from jaxkv.errors import UserError

__all__ = ["ChatTemplate", "ChatTemplateError"]

_PROBE = "\ue000jaxkv-probe\ue000"  # a private-use marker that no template writes by itself


class ChatTemplateError(UserError):
    """A chat template that does not parse or render; the message says why."""


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    import jinja2
    import jinja2.ext
    import jinja2.sandbox

    def raise_exception(message):
        raise ChatTemplateError(f"the chat template refused the messages: {message}")

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):  # transformers' filter
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        import datetime

        return datetime.datetime.now().strftime(fmt)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template does not parse ({e})") from None


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template with the special-token strings it may refer to."""

    source: str
    bos_token: str | None = None
    eos_token: str | None = None

    def render(self, messages: Sequence[dict], *, add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` (each ``{"role": ..., "content": ...}``)."""
        import jinja2

        if not isinstance(messages, (list, tuple)) or not messages:
            raise ChatTemplateError("messages must be a non-empty list of {'role', 'content'} dicts")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
                raise ChatTemplateError(f"messages[{i}] must be a dict with 'role' and 'content'")
        try:
            return _compile(self.source).render(
                messages=list(messages), add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except ChatTemplateError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            raise ChatTemplateError(f"the chat template cannot render these messages "
                                    f"({type(e).__name__}: {e})") from None

    def end_of_turn_ids(self, tokenizer) -> list[int]:
        """The ids of the special token that ends an assistant turn (empty if there is none).

        Renders a conversation whose assistant reply is a marker and reads the first token the
        template writes after it; only a special (added) token counts."""
        text = self.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}],
                           add_generation_prompt=False)
        _, found, after = text.partition(_PROBE)
        if not found or not after:
            return []
        ids = tokenizer.encode(after, add_special_tokens=False).ids
        if not ids:
            return []
        special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
        first = tokenizer.id_to_token(ids[0])
        return [ids[0]] if first in special else []
