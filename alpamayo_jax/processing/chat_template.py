"""Chat-template rendering with Hugging Face's semantics, on the host.

A sandboxed Jinja environment with `trim_blocks` and `lstrip_blocks`, the `raise_exception`,
`strftime_now` and `tojson` helpers, the `{% generation %}` block and loop controls; the caller
passes the tokenizer's special tokens as template variables. `continue_final_message` is
implemented by rendering the final text with a marker after it and cutting the output at the
marker, so the model continues that message. `load_chat_template` finds a processor directory's
template where Hugging Face's processor looks for it.
"""

from __future__ import annotations

import copy
import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

CHAT_TEMPLATE_JSON = "chat_template.json"
CHAT_TEMPLATE_JINJA = "chat_template.jinja"

# Appended to the final message's text when continuing it; the rendered chat is cut here.
_CONTINUE_MARKER = "CONTINUE_FINAL_MESSAGE_TAG "


class PromptError(ValueError):
    """A chat template, prompt or model input that cannot produce the reference prompt."""


# ---------------------------------------------------------------------------------------------


def _default_template(value: Any, where: str) -> str:
    """A chat template entry: a string, or named templates ({name: template} or
    [{"name", "template"}]) of which "default" is taken."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        value = {item.get("name"): item.get("template") for item in value if isinstance(item, Mapping)}
    if isinstance(value, Mapping):
        if isinstance(value.get("default"), str):
            return value["default"]
        raise PromptError(f"{where}: several chat templates {sorted(value)} but none named 'default'")
    raise PromptError(f"{where}: chat_template must be a string, got {type(value).__name__}")


def load_chat_template(directory: str | Path) -> str:
    """The chat template of a processor directory, looked up where Hugging Face's processor
    looks: `chat_template.json` (legacy, takes precedence), then `chat_template.jinja`; as a
    last resort the tokenizer's `chat_template` in `tokenizer_config.json`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PromptError(f"processor directory {directory} does not exist")
    legacy = directory / CHAT_TEMPLATE_JSON
    if legacy.is_file():
        data = json.loads(legacy.read_text(encoding="utf-8"))
        if "chat_template" not in data:
            raise PromptError(f"{legacy} has no 'chat_template' entry")
        return _default_template(data["chat_template"], str(legacy))
    raw = directory / CHAT_TEMPLATE_JINJA
    if raw.is_file():
        return raw.read_text(encoding="utf-8")
    tokenizer_config = directory / "tokenizer_config.json"
    if tokenizer_config.is_file():
        data = json.loads(tokenizer_config.read_text(encoding="utf-8"))
        if data.get("chat_template") is not None:
            return _default_template(data["chat_template"], str(tokenizer_config))
    raise PromptError(
        f"no chat template in {directory}: expected {CHAT_TEMPLATE_JINJA}, {CHAT_TEMPLATE_JSON} or a "
        "'chat_template' entry in tokenizer_config.json"
    )


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks in some
    templates): renders its body unchanged."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Plain json.dumps: Jinja's own filter would HTML-escape the text.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)


@functools.lru_cache(maxsize=16)
def _compile(chat_template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(chat_template)
    except jinja2.TemplateSyntaxError as e:
        raise PromptError(f"chat template syntax error, line {e.lineno}: {e.message}") from None


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    chat_template: str,
    *,
    add_generation_prompt: bool = False,
    continue_final_message: bool = False,
    **variables: Any,
) -> str:
    """Renders `messages` with a Jinja chat template as Hugging Face's `apply_chat_template`
    does. `variables` (e.g. the tokenizer's special tokens, `add_vision_id`) are passed to the
    template. With `continue_final_message` the text ends where the final message's last text
    item ends (no end-of-turn token), so the model continues that message."""
    if not isinstance(chat_template, str) or not chat_template:
        raise PromptError("a chat template (a non-empty string) is required")
    if continue_final_message and add_generation_prompt:
        raise PromptError("continue_final_message and add_generation_prompt cannot be used together")
    messages = list(messages)
    if not messages:
        raise PromptError("no messages to render")
    final_text = None
    if continue_final_message:
        messages = copy.deepcopy(messages)
        content = messages[-1]["content"]
        if isinstance(content, str):
            final_text = content
            messages[-1]["content"] = content + _CONTINUE_MARKER
        else:
            for item in reversed(content):
                if "text" in item:
                    final_text = item["text"]
                    item["text"] = item["text"] + _CONTINUE_MARKER
                    break
            else:
                raise PromptError("continue_final_message: the final message has no text to continue")
    try:
        rendered = _compile(chat_template).render(
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except jinja2.TemplateError as e:
        raise PromptError(f"chat template failed: {e}") from e
    if continue_final_message:
        marker = _CONTINUE_MARKER.strip()
        if final_text.strip() not in rendered or marker not in rendered:
            raise PromptError(
                "continue_final_message: the chat template dropped part of the final message, "
                "so the prompt cannot end inside it"
            )
        at = rendered.rindex(marker)
        if rendered[at : at + len(_CONTINUE_MARKER)] == _CONTINUE_MARKER:
            rendered = rendered[:at]
        else:  # the template trimmed the whitespace after the marker; trim before it too
            rendered = rendered[:at].rstrip()
    return rendered
