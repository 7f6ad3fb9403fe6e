"""Text <-> token ids and chat rendering for a local Hugging Face model directory, without torch.

Only the `tokenizers` library (Rust) and jinja2 are used, so the router can tokenize and render
chat templates without importing torch or transformers. For a directory whose tokenizer.json is
a plain `tokenizers` serialization (the default SmolLM2 conversion is one) the results are
identical to `transformers.AutoTokenizer.from_pretrained(dir)` (tests/runtime/test_tokenizer.py
checks encode, decode and apply_chat_template against transformers).

What is read from the directory:
    tokenizer.json          the tokenizer itself (required)
    tokenizer_config.json   special token names, chat_template, clean_up_tokenization_spaces
    chat_template.jinja     the chat template; takes priority over tokenizer_config, as in HF
    additional_chat_templates/*.jinja   named templates (e.g. "tool_use")
    generation_config.json, config.json   more eos ids

Differences from transformers, all deliberate:
- `add_bos_token`/`add_eos_token` in tokenizer_config.json are ignored, as transformers 5 does
  whenever tokenizer.json exists: the post-processor serialized there decides what
  `add_special_tokens=True` adds.
- A special token named in tokenizer_config.json but absent from the vocabulary is an error
  (transformers silently adds it as a new token, shifting the vocabulary).
- `decode` rejects ids outside the vocabulary (the tokenizers library silently drops them).
- Template inputs must be JSON-like values (transformers turns anything else into a placeholder
  string); messages must carry a string "role".
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as BackendTokenizer

# The named special tokens that transformers exposes to chat templates as variables.
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
DEFAULT_TEMPLATE_NAME = "default"
TOOL_USE_TEMPLATE_NAME = "tool_use"
# Older jinja2 releases have known sandbox escapes; chat templates are untrusted code.
MIN_JINJA2_VERSION = (3, 1, 6)
# Names a message's reasoning may arrive under; transformers 5 fills all of the first two.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class TokenizerConfigError(ValueError):
    """The model directory's tokenizer files are missing, malformed or inconsistent."""


class ChatTemplateError(ValueError):
    """A chat could not be rendered: no template, a template error, or invalid messages."""


@dataclass(frozen=True, slots=True, eq=False)
class Tokenizer:
    """A loaded tokenizer. Immutable after `from_dir`; safe to share between threads.

    The backend's encode/decode run in Rust with `&self` and hold no per-call state.
    """

    backend: BackendTokenizer  # never mutated after from_dir (truncation/padding are off)
    vocab_size: int  # number of ids including added tokens, as len(hf_tokenizer)
    bos_token_id: int | None
    eos_token_ids: frozenset[int]  # tokenizer eos ∪ generation_config ∪ config eos ids
    pad_token_id: int | None
    # Every id that decode(skip_special_tokens=True) drops: all added tokens flagged special.
    # A superset of transformers' all_special_ids, which lists only the named tokens.
    all_special_ids: frozenset[int]
    # Ids the decoder turns into raw bytes (sentencepiece byte fallback, "<0xE2>"); empty unless
    # the decoder has a ByteFallback step. Its output is not prefix-stable: one invalid byte
    # turns the whole run of byte tokens into U+FFFD (the detokenizer must know).
    byte_fallback_ids: frozenset[int]
    special_tokens: Mapping[str, str]  # e.g. "bos_token" -> "<|im_start|>"; template variables
    chat_templates: Mapping[str, str]  # template name -> jinja source; "default" is the model's

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load the tokenizer of the HF model directory `path` (no network, no transformers)."""
        model_dir = Path(path)
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TokenizerConfigError(
                f"{model_dir} has no tokenizer.json; only tokenizers-library serializations "
                "are supported (save one with transformers' tokenizer.save_pretrained)"
            )
        backend = BackendTokenizer.from_file(str(tokenizer_file))
        # transformers never truncates or pads unless asked per call; neither do we.
        backend.no_truncation()
        backend.no_padding()
        config = _read_json_object(model_dir / "tokenizer_config.json")
        _reject_unsupported_cleanup(config, backend, model_dir)
        special_tokens = _special_token_names(config)
        special_ids = {name: _token_id(backend, token) for name, token in special_tokens.items()}
        eos_ids = {special_ids["eos_token"]} if "eos_token" in special_ids else set()
        for extra_config in ("generation_config.json", "config.json"):
            eos_ids |= _eos_ids_of(model_dir / extra_config)
        return cls(
            backend=backend,
            vocab_size=backend.get_vocab_size(with_added_tokens=True),
            bos_token_id=special_ids.get("bos_token"),
            eos_token_ids=frozenset(eos_ids),
            pad_token_id=special_ids.get("pad_token"),
            all_special_ids=frozenset(
                token_id
                for token_id, added in backend.get_added_tokens_decoder().items()
                if added.special
            ),
            byte_fallback_ids=_byte_fallback_ids(backend),
            special_tokens=MappingProxyType(special_tokens),
            chat_templates=MappingProxyType(_chat_templates(model_dir, config)),
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Special tokens written in `text` are recognized as such."""
        ids: list[int] = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; raises ValueError for an id outside [0, vocab_size)."""
        token_ids = list(ids)
        for token_id in token_ids:
            self._check_id(token_id)
        text: str = self.backend.decode(token_ids, skip_special_tokens=skip_special_tokens)
        return text

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary string of one id (byte-level form, e.g. 'Ġthe')."""
        self._check_id(token_id)
        token = self.backend.id_to_token(token_id)
        if token is None:
            raise ValueError(f"token id {token_id} is a gap in the vocabulary")
        return str(token)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.id_to_token(token_id) for token_id in ids]

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Render `messages` with the model's chat template (or `chat_template`).

        `chat_template` is either a template name from `chat_templates` or jinja source.
        `kwargs` become template variables and override the special token names, as in
        transformers. Raises ChatTemplateError for a missing template, invalid messages or any
        failure inside the template (templates are untrusted programs run in a sandbox).
        """
        source = self._select_template(chat_template, tools)
        if not messages:
            raise ChatTemplateError("cannot render an empty conversation")
        conversation = [_template_message(index, m) for index, m in enumerate(messages)]
        variables = {**self.special_tokens, **_plain(kwargs, "template variables")}
        template = _compile(source)
        try:
            return template.render(
                messages=conversation,
                tools=None if tools is None else _plain(list(tools), "tools"),
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except ChatTemplateError:
            raise
        except Exception as exc:
            # Broad on purpose: whatever the template program does wrong (UndefinedError,
            # SecurityError, TypeError from `str + list`, ...) is a template failure.
            raise ChatTemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from exc

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """Token ids of the rendered chat; the template writes the special tokens itself."""
        text = self.apply_chat_template(
            messages, add_generation_prompt, tools, chat_template, **kwargs
        )
        return self.encode(text, add_special_tokens=False)

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(
                f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})"
            )

    def _select_template(
        self, chat_template: str | None, tools: Sequence[Mapping[str, Any]] | None
    ) -> str:
        if chat_template is not None:
            return self.chat_templates.get(chat_template, chat_template)
        if tools is not None and TOOL_USE_TEMPLATE_NAME in self.chat_templates:
            return self.chat_templates[TOOL_USE_TEMPLATE_NAME]
        if DEFAULT_TEMPLATE_NAME in self.chat_templates:
            return self.chat_templates[DEFAULT_TEMPLATE_NAME]
        if not self.chat_templates:
            raise ChatTemplateError(
                "this tokenizer has no chat template (none in tokenizer_config.json or "
                "chat_template.jinja); pass chat_template= explicitly"
            )
        raise ChatTemplateError(
            f"this tokenizer has several chat templates {sorted(self.chat_templates)} and no "
            f"{DEFAULT_TEMPLATE_NAME!r} one; pass chat_template=<name>"
        )


# ---------------------------------------------------------------- loading helpers


def _read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} when the file does not exist (all of them optional)."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TokenizerConfigError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise TokenizerConfigError(f"{path} must hold a JSON object")
    return value


def _reject_unsupported_cleanup(
    config: Mapping[str, Any], backend: BackendTokenizer, model_dir: Path
) -> None:
    # transformers applies its WordPiece-era "clean_up_tokenization" to non-BPE models when this
    # flag is set; that rewrite is not implemented here, so refuse rather than decode differently.
    if config.get("clean_up_tokenization_spaces") and type(backend.model).__name__ != "BPE":
        raise TokenizerConfigError(
            f"{model_dir}: clean_up_tokenization_spaces=true for a "
            f"{type(backend.model).__name__} model is not supported"
        )


def _special_token_names(config: Mapping[str, Any]) -> dict[str, str]:
    names: dict[str, str] = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = config.get(name)
        if value is None:
            continue
        if isinstance(value, Mapping):  # serialized AddedToken
            value = value.get("content")
        if not isinstance(value, str):
            raise TokenizerConfigError(f"tokenizer_config.json: {name} must be a string")
        names[name] = value
    return names


def _token_id(backend: BackendTokenizer, token: str) -> int:
    token_id = backend.token_to_id(token)
    if token_id is None:
        raise TokenizerConfigError(f"special token {token!r} is not in tokenizer.json")
    return int(token_id)


def _byte_fallback_ids(backend: BackendTokenizer) -> frozenset[int]:
    if backend.decoder is None:
        return frozenset()
    pending = [json.loads(backend.decoder.__getstate__())]
    while pending:  # the decoder may be a (nested) Sequence
        step = pending.pop()
        if step.get("type") == "ByteFallback":
            ids = (backend.token_to_id(f"<0x{byte:02X}>") for byte in range(256))
            return frozenset(token_id for token_id in ids if token_id is not None)
        pending.extend(step.get("decoders") or [])
    return frozenset()


def _eos_ids_of(path: Path) -> set[int]:
    value = _read_json_object(path).get("eos_token_id")
    if value is None:
        return set()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TokenizerConfigError(f"{path}: eos_token_id must be an int or a list of ints")
    return set(values)


def _chat_templates(model_dir: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """Template name -> source. Template files take priority over tokenizer_config entries."""
    templates: dict[str, str] = {}
    template_file = model_dir / "chat_template.jinja"
    if template_file.is_file():
        templates[DEFAULT_TEMPLATE_NAME] = template_file.read_text(encoding="utf-8")
    extra_dir = model_dir / "additional_chat_templates"
    if extra_dir.is_dir():
        for extra in sorted(extra_dir.glob("*.jinja")):
            templates[extra.stem] = extra.read_text(encoding="utf-8")
    if templates:
        return templates
    raw = config.get("chat_template")
    if raw is None:
        return {}
    if isinstance(raw, str):
        return {DEFAULT_TEMPLATE_NAME: raw}
    if isinstance(raw, list) and all(
        isinstance(t, Mapping)
        and isinstance(t.get("name"), str)
        and isinstance(t.get("template"), str)
        for t in raw
    ):
        return {t["name"]: t["template"] for t in raw}
    raise TokenizerConfigError(
        "tokenizer_config.json: chat_template must be a string or a list of {name, template}"
    )


# ---------------------------------------------------------------- template inputs


def _plain(value: Any, what: str) -> Any:
    """A deep copy of `value` made of JSON types only.

    Rich objects have methods the sandbox does not know to be dangerous, so nothing else
    reaches a template. Subclasses of str/int/float are reduced to the base type.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k, what): _plain(v, what) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item, what) for item in value]
    raise ChatTemplateError(f"{what} may hold only JSON values, got {type(value).__name__}")


def _template_message(index: int, message: Mapping[str, Any]) -> dict[str, Any]:
    """One message as templates see it, following transformers 5.

    None-valued keys are dropped (OpenAI clients send content=None with tool calls; templates
    handle a missing key but print "None"), and reasoning is aliased to the names templates read.
    """
    if not isinstance(message, Mapping):
        raise ChatTemplateError(f"message {index} must be a mapping, got {type(message).__name__}")
    plain = {k: v for k, v in _plain(message, f"message {index}").items() if v is not None}
    if not isinstance(plain.get("role"), str):
        raise ChatTemplateError(f"message {index} has no string 'role'")
    reasoning = next((plain[k] for k in _REASONING_FIELDS if k in plain), None)
    if reasoning is not None:
        plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
    return plain


# ---------------------------------------------------------------- the sandbox


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template rejected the conversation: {message}")


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Replaces jinja's tojson, which HTML-escapes; same signature as transformers' filter.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format_string: str) -> str:
    return datetime.now().strftime(format_string)


def _template_dict(*args: Any, **kwargs: Any) -> dict[Any, Any]:
    # A plain function instead of the `dict` type, so templates cannot reach type attributes.
    return dict(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja's namespace() minus underscore-prefixed attributes (a route to CPython internals)."""

    # No named `self`, like jinja's Namespace: `namespace(self=1)` must stay a valid call.
    def __init__(*args: Any, **kwargs: Any) -> None:
        self, positional = args[0], args[1:]
        attrs = dict(*positional, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise ChatTemplateError(f"chat templates may not set namespace attribute {name!r}")


class _GenerationTag(jinja2.ext.Extension):
    """Accepts transformers' `{% generation %}...{% endgeneration %}` and renders the body as is.

    transformers uses the tag to build assistant-token masks for training; serving only needs
    the templates that contain it to parse.
    """

    tags = {"generation"}  # noqa: RUF012  (jinja's Extension API declares it this way)

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)  # the `generation` name token
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


@functools.lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    version = tuple(int(part) for part in importlib.metadata.version("jinja2").split(".")[:3])
    if version < MIN_JINJA2_VERSION:
        raise ChatTemplateError(
            f"jinja2>={'.'.join(map(str, MIN_JINJA2_VERSION))} is required to run chat templates "
            f"safely (older releases have sandbox escapes); found {'.'.join(map(str, version))}"
        )
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _template_dict
    env.globals["namespace"] = _TemplateNamespace
    return env


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template does not parse: {exc}") from exc
