"""Literal ids and labels per data format, with the tiny tokenizer whose ids are written by hand:
<s>=1, </s>=2, "\\n"=3, a printable character c = ord(c) - 28 (space=4, "A"=37, "a"=69),
merges ".\\n"=99, ":\\n"=100, "##"=101, "###"=102, "th"=103, "e "=104, " t"=105."""

from __future__ import annotations

import copy

import pytest

from tuning.config.args import DataArgs
from tuning.data.chat import ChatTemplate
from tuning.data.formats import RowTemplate, combine_input_output, response_spans
from tuning.data.prepare import encoding_context, process_batch
from tuning.data.tokenize import NO_TEMPLATE, OK, tokenize_batch
from tuning.errors import UserError

X = -100


def ids_labels(out: dict, i: int = 0) -> tuple[list[int], list[int]]:
    return out["input_ids"][i], out["labels"][i]


def test_whole_text_is_trained_and_eos_appended(tokenizer):
    out = tokenize_batch(tokenizer, ["Hi"], [[(0, 2)]], max_len=64)
    assert ids_labels(out) == ([1, 44, 77, 2], [X, 44, 77, 2])
    assert out["status"] == [OK] and out["truncated"] == [False]


def test_response_template_whose_newline_merges_with_previous_token(tokenizer):
    # "Q.\n### A: yes": ".\n" is one token (99), so the template's own ids [3, 102, 4, 37, 30] never
    # occur in the sequence; the character search still finds it and masks through "A:".
    args = DataArgs(dataset_text_field="text", response_template="\\n### A:")
    out = process_batch(
        {"text": ["Q.\n### A: yes"]}, fmt="text", ctx=encoding_context(args, tokenizer, 64, ())
    )
    ids, labels = ids_labels(out)
    assert ids == [1, 53, 99, 102, 4, 37, 30, 4, 93, 73, 87, 2]
    assert labels == [X, X, X, X, X, X, X, 4, 93, 73, 87, 2]
    assert tokenizer(args.response_template, add_special_tokens=False).input_ids == [3, 102, 4, 37, 30]


def test_eos_already_in_text_is_not_doubled_and_is_trained(tokenizer):
    out = tokenize_batch(tokenizer, ["ok</s>"], [[(0, 0)]], max_len=64)
    assert ids_labels(out) == ([1, 83, 79, 2], [X, X, X, 2])


def test_truncated_sample_keeps_no_eos(tokenizer):
    out = tokenize_batch(tokenizer, ["abcdef"], [[(0, 6)]], max_len=4)
    assert ids_labels(out) == ([1, 69, 70, 71], [X, 69, 70, 71])
    assert out["truncated"] == [True]


def test_template_not_found_is_reported_per_row(tokenizer):
    args = DataArgs(dataset_text_field="text", response_template="### A:")
    batch = {"text": ["no marker here", "x ### A: y"]}
    out = process_batch(batch, fmt="text", ctx=encoding_context(args, tokenizer, 64, ()))
    assert out["status"] == [NO_TEMPLATE, OK]
    assert out["labels"][1] == [X] * 7 + [4, 93, 2]  # <s> x " " ### " " A : | " " y </s>


def test_input_output_trains_on_output_only(tokenizer):
    args = DataArgs()
    out = process_batch(
        {"input": ["Hi"], "output": ["ok"]}, fmt="input_output", ctx=encoding_context(args, tokenizer, 64, ())
    )
    # "Hi" + " " + "ok": the joining space belongs to the output
    assert ids_labels(out) == ([1, 44, 77, 4, 83, 79, 2], [X, X, X, 4, 83, 79, 2])


@pytest.mark.parametrize(
    ("source", "target", "text", "span"),
    [
        ("a", "b", "a b", (1, 3)),
        ("a ", "b", "a b", (2, 3)),
        ("a", "\nb", "a\nb", (1, 3)),
        ("", "b", "b", (0, 1)),
    ],
    ids=["joined-by-space", "input-ends-with-space", "output-starts-with-newline", "empty-input"],
)
def test_combine_input_output(source, target, text, span):
    assert combine_input_output(source, target) == (text, span)


def test_formatter_template_renders_columns_and_masks_before_label(tokenizer):
    args = DataArgs(
        data_formatter_template="### Input: {{input}} \\n\\n## Label: {{output}}",
        response_template="\\n## Label:",
    )
    batch = {"input": ["hi"], "output": ["ok"]}
    out = process_batch(batch, fmt="template", ctx=encoding_context(args, tokenizer, 64, ()))
    ids, labels = ids_labels(out)
    assert tokenizer.decode(ids) == "<s>### Input: hi \n\n## Label: ok</s>"
    assert labels[-4:] == [4, 83, 79, 2] and set(labels[:-4]) == {X}


def test_formatter_template_accepts_column_names_with_spaces():
    assert (
        RowTemplate("T: {{Tweet text}} {{ label }}").render({"Tweet text": "a b", "label": 1}) == "T: a b 1"
    )


def test_formatter_template_missing_column_names_available_ones():
    with pytest.raises(UserError, match=r"missing column.*available columns: \['input'\]"):
        RowTemplate("{{input}} {{outptu}}").render({"input": "x"})


def test_formatter_template_is_sandboxed():
    with pytest.raises(Exception, match="unsafe|not safely|access to attribute"):
        RowTemplate("{{ input.__class__.__mro__[1].__subclasses__() }}").render({"input": "x"})


@pytest.mark.parametrize(
    ("response", "instruction", "spans"),
    [
        (None, None, [(0, 22)]),
        ("A:", None, [(7, 22)]),  # from the end of the first response marker to the end
        ("A:", "Q:", [(7, 10), (17, 22)]),  # each answer up to the next question
    ],
)
def test_response_spans(response, instruction, spans):
    assert response_spans("Q: x A: y Q: z A: w </", response, instruction) == spans


def test_chat_trains_assistant_turns_through_their_stop_token(tokenizer):
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
    ]
    out = process_batch(
        {"messages": [messages]},
        fmt="chat",
        ctx=encoding_context(DataArgs(), tokenizer, 64, (tokenizer.eos_token_id,)),
    )
    ids, labels = ids_labels(out)
    # context "<s><|user|>\nhi</s>\n<|assistant|>\n", completion "yo</s>": the "\n" the template writes
    # after the stop token is never generated, so the sample ends there
    assert tokenizer.decode(ids) == "<s><|user|>\nhi</s>\n<|assistant|>\nyo</s>"
    assert ids[0] == 1 and ids.count(1) == 1  # the template's BOS, not a second one
    assert labels == [X] * (len(ids) - 3) + [93, 83, 2]  # "yo", EOS


def test_pretokenized_rows_are_used_as_is():
    batch = {"input_ids": [[5, 6, 7]], "labels": [[X, 6, 7]]}
    out = process_batch(batch, fmt="pretokenized", ctx=encoding_context(DataArgs(), None, 2, ()))
    assert out["input_ids"] == [[5, 6]] and out["labels"] == [[X, 6]] and out["truncated"] == [True]
    out = process_batch(
        {"input_ids": [[5, 6]]}, fmt="pretokenized", ctx=encoding_context(DataArgs(), None, 8, ())
    )
    assert out["labels"] == [[5, 6]]


def test_chat_data_without_a_chat_template_is_a_user_error(tokenizer):
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(UserError, match="chat data needs a chat template.*pass --chat_template"):
        ChatTemplate(bare)
