"""Data handlers: literal ids and labels from the tiny char-level tokenizer (``c`` → ``ord(c) - 28``,
``<s>``=1, ``</s>``=2, ``\\n``=3, space=4; merges ``.\\n``=99, ``:\\n``=100, ``###``=102)."""

from __future__ import annotations

import logging

import datasets
import pytest

from tuning.data import chat
from tuning.data.handlers import HANDLERS, get_handler, register_handler, resolve_kwargs
from tuning.data.handlers.chat import tokenize_and_apply_chat_template_with_masking as chat_masking
from tuning.data.handlers.columns import duplicate_columns, skip_samples_with_large_columns
from tuning.data.handlers.templates import apply_custom_jinja_template, apply_tokenizer_chat_template
from tuning.data.handlers.tokenizing import tokenize, tokenize_and_apply_input_masking
from tuning.errors import UserError

X = -100


def ids_labels(out: dict) -> dict:
    return {"input_ids": out["input_ids"], "labels": out["labels"]}


HI_YO = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]]


def test_tokenize_adds_bos_and_attention_mask(tokenizer):
    out = tokenize({"text": ["ab."]}, tokenizer=tokenizer)
    assert out == {"input_ids": [[1, 69, 70, 18]], "attention_mask": [[1, 1, 1, 1]]}


def test_input_masking_trains_output_seam_space_and_eos(tokenizer):
    out = tokenize_and_apply_input_masking({"input": ["hi"], "output": ["yo"]}, tokenizer=tokenizer)
    assert out == {"input_ids": [[1, 76, 77, 4, 93, 83, 2]], "labels": [[X, X, X, 4, 93, 83, 2]]}
    no_eos = tokenize_and_apply_input_masking(
        {"q": ["hi"], "a": ["yo"]},
        tokenizer=tokenizer,
        input_column_name="q",
        output_column_name="a",
        add_eos_token=False,
    )
    assert no_eos == {"input_ids": [[1, 76, 77, 4, 93, 83]], "labels": [[X, X, X, 4, 93, 83]]}


def test_custom_jinja_template_sees_columns_and_special_tokens(tokenizer):
    batch = {"input": ["hi"], "output": ["yo"], "Tweet text": ["t"]}
    out = apply_custom_jinja_template(
        batch, tokenizer=tokenizer, template="{{Tweet text}}|{{input}}:{{output}}{{eos_token}}"
    )
    assert out == {"formatted_text": ["t|hi:yo</s>"]}
    with pytest.raises(UserError, match="template refers to a missing column"):
        apply_custom_jinja_template(batch, tokenizer=tokenizer, template="{{nope}}")


def test_tokenizer_chat_template_render_only_column_and_whole_row(tokenizer):
    out = apply_tokenizer_chat_template(
        {"messages": HI_YO},
        tokenizer=tokenizer,
        chat_template=None,
        chat_settings=chat.ChatSettings(()),
        conversation_column_name="messages",
    )
    assert out == {"formatted_chat_data": ["<s><|user|>\nhi</s>\n<|assistant|>\nyo</s>\n"]}
    # the reference tool's templates index the whole row: messages['messages']
    row_template = (
        "{% for m in messages['messages'] %}{{ m['role'] }}={{ m['content'] }}{{ eos_token }}{% endfor %}"
    )
    out = apply_tokenizer_chat_template(
        {"messages": HI_YO, "id": [7]},
        tokenizer=tokenizer,
        chat_template=row_template,
        chat_settings=chat.ChatSettings(()),
    )
    assert out == {"formatted_chat_data": ["user=hi</s>assistant=yo</s>"]}


def test_chat_masking_prefix_template_trains_assistant_turn_through_its_stop_token(tokenizer):
    out = chat_masking(
        {"messages": HI_YO}, tokenizer=tokenizer, chat_template=None, chat_settings=chat.ChatSettings(())
    )
    # <s><|user|>\nhi</s>\n<|assistant|>\n + [yo</s>]: the template's "\n" after </s> is never generated
    assert out["input_ids"][0][-3:] == [93, 83, 2] and len(out["input_ids"][0]) == 31
    assert out["labels"] == [[X] * 28 + [93, 83, 2]]
    assert out["chat_sample"] == [[0, 1, 0]] and out["_source_rows"] == [0]


def test_chat_masking_generation_template(tokenizer):
    template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}A:{% generation %}{{ m['content'] }}"
        "{{ eos_token }}{% endgeneration %}{% else %}U:{{ m['content'] }}\n{% endif %}{% endfor %}"
    )
    out = chat_masking(
        {"messages": HI_YO}, tokenizer=tokenizer, chat_template=template, chat_settings=chat.ChatSettings(())
    )
    assert ids_labels(out) == {
        "input_ids": [[57, 30, 76, 77, 3, 37, 30, 93, 83, 2]],
        "labels": [[X, X, X, X, X, X, X, 93, 83, 2]],
    }


def test_chat_masking_header_that_tokenizes_differently_in_context(tokenizer):
    # "\n### A:\n" alone starts with "\n" (3); after "hi." the "\n" merges into ".\n" (99), so a token-id
    # search for the header would miss it. The generation prompt ("### A": trim_blocks eats its newline)
    # differs from the in-turn header, so the sample is the inference context, prompt included, then the
    # completion the template writes for the turn.
    template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
        "{% else %}{{ m['content'] }}\n### A:\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}\n### A{% endif %}"
    )
    convo = [[{"role": "user", "content": "hi."}, {"role": "assistant", "content": "yo"}]]
    out = chat_masking(
        {"messages": convo}, tokenizer=tokenizer, chat_template=template, chat_settings=chat.ChatSettings(())
    )
    assert ids_labels(out) == {
        "input_ids": [[76, 77, 99, 102, 4, 37, 100, 102, 4, 37, 93, 83, 2]],
        "labels": [[X] * 10 + [93, 83, 2]],
    }


def test_chat_masking_multi_turn_and_tools_documents(tokenizer):
    template = (
        "{% if tools %}T{{ tools | length }}{% endif %}{% if documents %}D{{ documents | length }}{% endif %}"
        "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}a:{% endif %}"
    )
    convo = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "x"},
        {"role": "tool", "content": "r"},
        {"role": "assistant", "content": "y"},
    ]
    batch = {"messages": [convo], "tools": [[{"name": "f"}]], "documents": [[{"text": "d"}, {"text": "e"}]]}
    out = chat_masking(
        batch, tokenizer=tokenizer, chat_template=template, chat_settings=chat.ChatSettings(())
    )
    # T1D2u:qa:xt:ra:y -> only "x" and "y" trained
    assert out["input_ids"] == [[56, 21, 40, 22, 89, 30, 85, 69, 30, 92, 88, 30, 86, 69, 30, 93]]
    assert out["labels"] == [[X] * 9 + [92] + [X] * 5 + [93]]


def test_chat_masking_splits_a_template_that_rewrites_earlier_turns(tokenizer):
    # drops the text of every assistant turn but the last (as reasoning templates do with thoughts): each
    # turn is trained in a sample where it is the last message, after the context it has at inference
    template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}[old]"
        "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    convo = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * 2
    batch = {"messages": [convo], "id": [7]}
    out = chat_masking(
        batch, tokenizer=tokenizer, chat_template=template, chat_settings=chat.ChatSettings(())
    )
    # "ab" (turn 1), then "a[old]a" + "b" (turn 3): a=69 b=70 [=63 o=83 l=80 d=72 ]=65
    assert ids_labels(out) == {
        "input_ids": [[69, 70], [69, 63, 83, 80, 72, 65, 69, 70]],
        "labels": [[X, 70], [X] * 7 + [70]],
    }
    assert out["chat_sample"] == [[0, 2, 0], [1, 2, 0]] and out["_source_rows"] == [0, 0]


def test_column_handlers():
    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2], [1, 2, 3, 4]], "x": ["a", "b"]})
    dup = ds.map(
        duplicate_columns,
        batched=True,
        fn_kwargs=get_kwargs("duplicate_columns", old_column="input_ids", new_column="labels"),
    )
    assert dup["labels"] == [[1, 2], [1, 2, 3, 4]]
    kept = ds.filter(
        skip_samples_with_large_columns,
        batched=True,
        fn_kwargs={"column_name": "input_ids", "max_allowed_length": 3},
    )
    assert kept["x"] == ["a"]
    renamed = HANDLERS["rename_columns"].fn(ds, column_mapping={"x": "y"})
    assert renamed.column_names == ["input_ids", "y"]
    assert HANDLERS["select_columns"].fn(ds, column_names=["x"]).column_names == ["x"]
    assert HANDLERS["remove_columns"].fn(ds, column_names=["x"]).column_names == ["input_ids"]


def get_kwargs(name: str, **given) -> dict:
    return resolve_kwargs(HANDLERS[name], given, "here")


def test_resolve_kwargs_aliases_ignored_unknown_and_types(caplog):
    with caplog.at_level(logging.WARNING):
        kwargs = get_kwargs(
            "tokenize_and_apply_chat_template_with_masking", conversation_column="c", max_seq_length=1024
        )
    assert kwargs == {"conversation_column_name": "c"}
    assert "argument 'conversation_column' is deprecated, use 'conversation_column_name'" in caplog.text
    assert "argument 'max_seq_length' is ignored" in caplog.text
    with pytest.raises(
        UserError, match=r"takes no argument 'input_colum_name' \(did you mean 'input_column_name'\?\)"
    ):
        get_kwargs("tokenize_and_apply_input_masking", input_colum_name="a")
    with pytest.raises(
        UserError, match="'max_allowed_length' of handler 'skip_samples_with_large_columns' must be int"
    ):
        get_kwargs("skip_samples_with_large_columns", column_name="a", max_allowed_length="50")
    with pytest.raises(UserError, match="needs argument 'column_name'"):
        get_kwargs("skip_samples_with_large_columns", max_allowed_length=5)
    with pytest.raises(UserError, match=r"unknown data handler 'tokenise' \(did you mean 'tokenize'\?\)"):
        get_handler("tokenise", "here")


def test_user_registered_handler(tokenizer):
    @register_handler("test_upper_output", columns=("column",))
    def upper(batch: dict, *, column: str = "output", times: int = 1) -> dict:
        return {column: [v.upper() * times for v in batch[column]]}

    try:
        handler = HANDLERS["test_upper_output"]
        assert list(handler.params) == ["column", "times"] and handler.kind == "map"
        assert upper({"output": ["ab"]}, **get_kwargs("test_upper_output", times=2)) == {"output": ["ABAB"]}
    finally:
        del HANDLERS["test_upper_output"]
