"""runtime.tokenizer: identical to transformers on SmolLM2, and explicit about every failure."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers

from runtime.tokenizer import ChatTemplateError, Tokenizer, TokenizerConfigError

TEXTS = [
    "",
    "Hello, world!",
    "The capital of France is Paris.",
    "  leading and trailing spaces  ",
    "whitespace\t\truns \n\n\n   and\r\nCRLF \u00a0nbsp",
    "                                        ",
    "东京是日本的首都。北京烤鸭很好吃！",
    "日本語のテキストとカタカナ、ひらがな",
    "한국어 문장도 있습니다",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 keycap 1️⃣",
    "combining: e\u0301 a\u0308 Zalgo z\u0335\u0321\u0322a\u0337l\u0338g\u0336o",
    "مرحبا بالعالم",
    "<|im_start|>user\nhi<|im_end|>\n",
    "special tokens <|endoftext|> inside<|im_end|>text <repo_name>x",
    "not special: <|im_start <im_end|> < |im_end| >",
    "def f(x):\n    return x ** 2  # comment\n",
    "numbers 1234567890 3.14159 -42 1e-9",
    "URL https://example.com/a?b=c&d=e#f",
    "a" * 300,
    "€€€ £ ¥ ₿ ∑∫√ ≠ ≤",
    "\x00\x01 control \x7f chars",
]

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "日本の首都は？ 🗼"},
    ],
    [{"role": "user", "content": "text with <|im_end|> inside and\n\nnewlines  "}],
    [{"role": "user", "content": ""}],
    [{"role": "assistant", "content": "I start", "tool_calls": None}],
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(smollm2_dir)


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_dir: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(smollm2_dir)


# ------------------------------------------------------------ parity with transformers


@pytest.mark.model
def test_attributes_match_transformers(tokenizer: Tokenizer, hf_tokenizer: Any) -> None:
    assert tokenizer.vocab_size == len(hf_tokenizer) == 49152
    assert tokenizer.bos_token_id == hf_tokenizer.bos_token_id == 1
    assert tokenizer.pad_token_id == hf_tokenizer.pad_token_id == 2
    assert tokenizer.eos_token_ids == {hf_tokenizer.eos_token_id} == {2}
    assert set(hf_tokenizer.all_special_ids) <= tokenizer.all_special_ids
    assert tokenizer.all_special_ids == frozenset(range(17))
    assert dict(tokenizer.special_tokens) == hf_tokenizer.special_tokens_map


@pytest.mark.model
@pytest.mark.parametrize("add_special_tokens", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(
    tokenizer: Tokenizer, hf_tokenizer: Any, text: str, add_special_tokens: bool
) -> None:
    ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    assert ids == hf_tokenizer.encode(text, add_special_tokens=add_special_tokens)
    for skip in (True, False):
        assert tokenizer.decode(ids, skip_special_tokens=skip) == hf_tokenizer.decode(
            ids, skip_special_tokens=skip
        )
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.convert_ids_to_tokens(ids) == hf_tokenizer.convert_ids_to_tokens(ids)


@pytest.mark.model
@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.integers(min_value=0, max_value=49151), max_size=24))
def test_decode_of_arbitrary_ids_matches_transformers(
    tokenizer: Tokenizer, hf_tokenizer: Any, ids: list[int]
) -> None:
    # Arbitrary ids include byte tokens that split UTF-8 characters: both must agree on U+FFFD.
    for skip in (True, False):
        assert tokenizer.decode(ids, skip_special_tokens=skip) == hf_tokenizer.decode(
            ids, skip_special_tokens=skip
        )


@pytest.mark.model
@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=40))
def test_encode_of_arbitrary_text_matches_transformers(
    tokenizer: Tokenizer, hf_tokenizer: Any, text: str
) -> None:
    assert tokenizer.encode(text) == hf_tokenizer.encode(text)


@pytest.mark.model
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_matches_transformers(
    tokenizer: Tokenizer,
    hf_tokenizer: Any,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
) -> None:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    expected = hf_tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    assert text == expected
    expected_ids = hf_tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    assert (
        tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt) == expected_ids
    )


@pytest.mark.model
def test_smollm2_chat_prompt_is_chatml(tokenizer: Tokenizer) -> None:
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")
    ids = tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    assert ids[0] == tokenizer.bos_token_id  # written by the template, not added by encode
    assert ids.count(tokenizer.bos_token_id) == 3


@pytest.mark.model
def test_decode_rejects_ids_outside_the_vocabulary(tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([5, 49152])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.id_to_token(-1)


# ------------------------------------------------------------ a tiny tokenizer built here

WORDS = ["<unk>", "<s>", "</s>", "<pad>", "hello", "world", "user", "assistant", ":"]


def write_tiny_model_dir(
    path: Path, config: dict[str, Any], extra_files: dict[str, str] | None = None
) -> Path:
    backend = BackendTokenizer(
        models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>")
    )
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["<s>", "</s>", "<pad>"])
    path.mkdir(parents=True, exist_ok=True)
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    for name, content in (extra_files or {}).items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(content)
    return path


TINY_CONFIG = {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "pad_token": "<pad>"}
SIMPLE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] + ' : ' + m['content'] + ' ' }}"
    "{% endfor %}{% if add_generation_prompt %}assistant :{% endif %}"
)


def tiny(tmp_path: Path, **config: Any) -> Tokenizer:
    return Tokenizer.from_dir(write_tiny_model_dir(tmp_path / "m", {**TINY_CONFIG, **config}))


def test_special_ids_and_eos_union(tmp_path: Path) -> None:
    model_dir = write_tiny_model_dir(
        tmp_path / "m",
        TINY_CONFIG,
        {
            "generation_config.json": json.dumps({"eos_token_id": [2, 7]}),
            "config.json": json.dumps({"eos_token_id": 8}),
        },
    )
    tok = Tokenizer.from_dir(model_dir)
    assert (tok.bos_token_id, tok.pad_token_id) == (1, 3)
    assert tok.eos_token_ids == {2, 7, 8}
    assert tok.all_special_ids == {1, 2, 3}
    assert tok.vocab_size == len(WORDS)
    assert tok.encode("hello <s> world") == [4, 1, 5]
    assert tok.decode([1, 4, 2]) == "hello"
    assert tok.decode([1, 4, 2], skip_special_tokens=False) == "<s> hello </s>"


def test_missing_files_and_bad_configs_are_errors(tmp_path: Path) -> None:
    with pytest.raises(TokenizerConfigError, match=r"no tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(TokenizerConfigError, match=r"not in tokenizer\.json"):
        tiny(tmp_path, unk_token="<mask>")
    bad_eos = write_tiny_model_dir(
        tmp_path / "bad", TINY_CONFIG, {"generation_config.json": '{"eos_token_id": "2"}'}
    )
    with pytest.raises(TokenizerConfigError, match="eos_token_id"):
        Tokenizer.from_dir(bad_eos)


def test_no_chat_template_is_an_error_not_a_default(tmp_path: Path) -> None:
    tok = tiny(tmp_path)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hello"}])
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "hello"}], chat_template=SIMPLE_TEMPLATE
    )
    assert rendered == "<s>user : hello assistant :"
    assert tok.encode_chat(
        [{"role": "user", "content": "hello"}], chat_template=SIMPLE_TEMPLATE
    ) == [1, 6, 8, 4, 7, 8]


def test_template_file_wins_and_named_templates_are_selected(tmp_path: Path) -> None:
    model_dir = write_tiny_model_dir(
        tmp_path / "m",
        {**TINY_CONFIG, "chat_template": "from-config"},
        {
            "chat_template.jinja": "from-file",
            "additional_chat_templates/tool_use.jinja": "tools={{ tools | length }}",
        },
    )
    tok = Tokenizer.from_dir(model_dir)
    messages = [{"role": "user", "content": "hello"}]
    assert tok.apply_chat_template(messages) == "from-file"
    assert tok.apply_chat_template(messages, tools=[{"name": "f"}]) == "tools=1"
    assert tok.apply_chat_template(messages, chat_template="tool_use", tools=[]) == "tools=0"

    listed = tiny(
        tmp_path / "listed",
        chat_template=[{"name": "a", "template": "A"}, {"name": "b", "template": "B"}],
    )
    with pytest.raises(ChatTemplateError, match="several chat templates"):
        listed.apply_chat_template(messages)
    assert listed.apply_chat_template(messages, chat_template="b") == "B"


@pytest.mark.parametrize(
    ("template", "messages", "match"),
    [
        ("{{ raise_exception('roles must alternate') }}", None, "roles must alternate"),
        ("{{ messages[0]['role'] + messages[0]['content'] }}", [{"content": "x"}], "'role'"),
        ("{{ messages[0]['nope'] + 'x' }}", None, "UndefinedError"),
        ("{{ ''.__class__.__mro__ }}", None, "SecurityError"),
        ("{% set ns = namespace(_x=1) %}", None, "namespace attribute"),
        ("{% for %}", None, "does not parse"),
        ("{{ messages[0]['content'] + 1 }}", None, "TypeError"),
    ],
)
def test_template_failures_are_chat_template_errors(
    tmp_path: Path, template: str, messages: list[dict[str, Any]] | None, match: str
) -> None:
    tok = tiny(tmp_path, chat_template=template)
    with pytest.raises(ChatTemplateError, match=match):
        tok.apply_chat_template(messages or [{"role": "user", "content": "hello"}])


def test_invalid_messages_are_rejected(tmp_path: Path) -> None:
    tok = tiny(tmp_path, chat_template=SIMPLE_TEMPLATE)
    with pytest.raises(ChatTemplateError, match="empty conversation"):
        tok.apply_chat_template([])
    with pytest.raises(ChatTemplateError, match="JSON values"):
        tok.apply_chat_template([{"role": "user", "content": object()}])


def test_template_helpers_behave_like_transformers(tmp_path: Path) -> None:
    template = (
        "{{ messages | tojson }}|{{ {'k': '<é>'} | tojson(indent=1) }}|"
        "{{ strftime_now('%Y') | length }}|{% generation %}{{ messages[0].content }}"
        "{% endgeneration %}|{{ dict(a=1)['a'] }}|{{ custom }}|{{ bos_token }}|"
        "{{ messages[0].reasoning_content }}"
    )
    tok = tiny(tmp_path, chat_template=template)
    messages = [{"role": "user", "content": "hé<b>", "thinking": "hmm", "name": None}]
    rendered = tok.apply_chat_template(messages, custom="c", bos_token="override")
    expected_json = json.dumps(
        [{"thinking": "hmm", "role": "user", "content": "hé<b>", "reasoning_content": "hmm"}],
        ensure_ascii=False,
    )
    assert rendered == f'{expected_json}|{{\n "k": "<é>"\n}}|4|hé<b>|1|c|override|hmm'
    assert messages[0] == {"role": "user", "content": "hé<b>", "thinking": "hmm", "name": None}


def test_trim_and_lstrip_blocks_like_transformers(tmp_path: Path) -> None:
    template = (
        "{% for m in messages %}\n    {% if m.role %}\n{{ m.content }}\n{% endif %}\n{% endfor %}"
    )
    tok = tiny(tmp_path, chat_template=template)
    assert tok.apply_chat_template(
        [{"role": "u", "content": "a"}, {"role": "u", "content": "b"}]
    ) == ("a\nb\n")
