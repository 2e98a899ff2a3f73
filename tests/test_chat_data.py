"""Dataset shapes, chat options and the token-level seam check, with the tiny tokenizer whose ids are
written by hand: a printable character c is ``ord(c) - 28`` (space=4, "A"=37, "a"=69), ``<s>``=1,
``</s>``=2, ``"\\n"``=3, merges ``".\\n"``=99 and ``":\\n"``=100; its chat template is
``<s><|role|>\\ncontent</s>\\n`` per message, ``<|assistant|>\\n`` as the generation prompt."""

from __future__ import annotations

import copy
import json
import logging

import pytest
from conftest import write_jsonl

from tuning import preview
from tuning.config import parse_config
from tuning.config.args import DataArgs
from tuning.data import build_datasets, chat, formats
from tuning.data.prepare import encoding_context, prepare_path, process_batch
from tuning.data.tokenize import IGNORE_INDEX
from tuning.errors import UserError
from tuning.testing.tiny_model import build_tokenizer

X = IGNORE_INDEX
HI_YO = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


def run(batch: dict, tokenizer, fmt: str, max_len: int = 512, **args) -> dict:
    data_args = DataArgs(**args)
    return process_batch(batch, fmt=fmt, ctx=encoding_context(data_args, tokenizer, max_len, ()))


def trained_text(tokenizer, out: dict, i: int = 0) -> str:
    return tokenizer.decode([t for t in out["labels"][i] if t != X])


# --- the rule that picks a format -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("columns", "flags", "fmt"),
    [
        (["messages", "text"], {}, "chat"),
        (["conversations"], {}, "chat"),
        (["prompt", "completion"], {}, "prompt_completion"),
        (["instruction", "input", "output"], {}, "alpaca"),
        (["instruction", "output"], {}, "alpaca"),
        (["input", "output"], {}, "input_output"),
        (["text", "id"], {}, "text"),
        (["input_ids", "messages"], {}, "pretokenized"),
        (["text"], {"dataset_conversation_field": "turns"}, "chat"),
        (["body"], {"dataset_text_field": "body"}, "text"),
        (["instruction", "output"], {"data_formatter_template": "{{instruction}}"}, "template"),
    ],
)
def test_format_rule(columns, flags, fmt):
    if fmt == "chat" and "dataset_conversation_field" in flags:
        columns = [*columns, flags["dataset_conversation_field"]]
    assert formats.resolve_format(DataArgs(**flags), columns) == fmt


def test_unknown_columns_name_every_shape():
    with pytest.raises(UserError, match="messages/conversations, prompt\\+completion, instruction\\+output"):
        formats.resolve_format(DataArgs(), ["question", "answer"])


# --- shapes ------------------------------------------------------------------------------------------


def test_text_column_trains_every_token_and_eos(tokenizer):
    out = run({"text": ["ab"]}, tokenizer, "text")
    assert out["input_ids"] == [[1, 69, 70, 2]] and out["labels"] == [[X, 69, 70, 2]]


def test_prompt_completion_strings_train_the_completion(tokenizer):
    out = run({"prompt": ["Q: a"], "completion": [" b"]}, tokenizer, "prompt_completion")
    # joined as they are (TRL's prompt-completion), completion and EOS trained
    assert out["input_ids"] == [[1, 53, 30, 4, 69, 4, 70, 2]]
    assert out["labels"] == [[X, X, X, X, X, 4, 70, 2]]
    whole = run({"prompt": ["Q: a"], "completion": [" b"]}, tokenizer, "prompt_completion", train_on="all")
    assert whole["labels"] == [[X, 53, 30, 4, 69, 4, 70, 2]]  # every token but the tokenizer's BOS


def test_prompt_completion_messages_train_only_the_completion_turns(tokenizer):
    prompt = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},  # the prompt's own assistant turn is context
        {"role": "user", "content": "c"},
    ]
    out = run(
        {"prompt": [prompt], "completion": [[{"role": "assistant", "content": "d"}]]},
        tokenizer,
        "prompt_completion",
    )
    assert len(out["input_ids"]) == 1 and trained_text(tokenizer, out) == "d</s>"
    text = tokenizer.decode(out["input_ids"][0])
    assert text == "<s><|user|>\na</s>\n<|assistant|>\nb</s>\n<|user|>\nc</s>\n<|assistant|>\nd</s>"


def test_sharegpt_rows_train_like_messages(tokenizer):
    sharegpt = [
        {"from": "system", "value": "s"},
        {"from": "human", "value": "hi"},
        {"from": "gpt", "value": "yo"},
    ]
    messages = [{"role": "system", "content": "s"}, *HI_YO]
    assert run({"conversations": [sharegpt]}, tokenizer, "chat") == run(
        {"messages": [messages]}, tokenizer, "chat"
    )
    with pytest.raises(UserError, match="unknown ShareGPT speaker 'from: robot'"):
        run({"conversations": [[{"from": "robot", "value": "x"}]]}, tokenizer, "chat")


def test_sharegpt_function_call_becomes_a_tool_call(tokenizer):
    messages = chat.normalize_messages(
        [
            {"from": "function_call", "value": '{"name": "f", "arguments": {"x": 1}}'},
            {"from": "observation", "value": "2"},
        ],
        "conversations",
    )
    assert messages == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}],
        },
        {"role": "tool", "content": "2"},
    ]


def test_alpaca_keeps_the_instruction(tokenizer):
    row = {"instruction": ["Add."], "input": ["2 2"], "output": ["4"]}
    out = run(row, tokenizer, "alpaca")
    # with a chat template: the instruction, a blank line and the input are the user's turn
    assert tokenizer.decode(out["input_ids"][0]) == "<s><|user|>\nAdd.\n\n2 2</s>\n<|assistant|>\n4</s>"
    assert trained_text(tokenizer, out) == "4</s>"
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    out = run(row, bare, "alpaca")
    assert (
        tokenizer.decode(out["input_ids"][0])
        == "<s>" + formats.ALPACA_PROMPT.format(instruction="Add.", input="2 2") + "4</s>"
    )
    assert trained_text(tokenizer, out) == "4</s>"
    no_input = run({"instruction": ["Add."], "input": [""], "output": ["4"]}, bare, "alpaca")
    assert "### Input" not in tokenizer.decode(no_input["input_ids"][0])


def test_data_file_shapes_through_prepare_path(tmp_path, tokenizer):
    """Real files go through the loader: Arrow gives rows without tools a null, and rows with fewer schema
    properties nulls for the others; the template sees each row's own tools, as given."""
    template = (
        "{% if documents %}D{{ documents | map(attribute='text') | join(',') }}\n{% endif %}"
        "{% if tools %}T{{ tools | tojson }}\n{% endif %}{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}"
        "{% if m['tool_calls'] is defined %}{{ m['tool_calls'] | tojson }}{% endif %}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}a:{% endif %}"
    )
    tools_a = [{"name": "f", "parameters": {"properties": {"x": {"type": "integer"}}}}]
    tools_b = [{"name": "g", "parameters": {"properties": {"y": {"type": "string"}}}}]
    call = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}],
    }
    rows = [
        {"messages": [{"role": "user", "content": "q"}, call], "tools": tools_a},
        {
            "messages": [{"role": "user", "content": "r"}, {"role": "assistant", "content": "s"}],
            "tools": tools_b,
        },
        {"messages": [{"role": "user", "content": "t"}, {"role": "assistant", "content": "u"}]},
        {
            "messages": [{"role": "user", "content": "v"}, {"role": "assistant", "content": "w"}],
            "documents": [{"text": "doc"}],
        },
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    args = DataArgs(training_data_path=str(path), chat_template=template)
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = template
    ds, fmt, stats = prepare_path(str(path), encoding_context(args, tokenizer, 512, ()))
    assert fmt == "chat" and stats.kept == 4
    texts = [tokenizer.decode(ids) for ids in ds["input_ids"]]
    expected = [
        tokenizer.apply_chat_template(
            r["messages"], tools=r.get("tools"), documents=r.get("documents"), tokenize=False
        )
        for r in rows
    ]
    assert texts == expected
    schema = '[{"name": "f", "parameters": {"properties": {"x": {"type": "integer"}}}}]'
    call = '[{"function": {"name": "f", "arguments": {"x": 1}}}]'
    assert texts[0] == f"T{schema}\nu:q</s>a:{call}</s>"  # no null property or argument from other rows
    assert texts[3] == "Ddoc\nu:v</s>a:w</s>"


def test_template_arguments_from_the_flag_and_the_row(tokenizer):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{{ mood | default('-') }}{{ eos_token }}"
    batch = {"messages": [HI_YO, HI_YO], "chat_template_kwargs": [None, '{"mood": "!"}']}
    flags = {"chat_template": template, "chat_template_kwargs": '{"mood": "?"}', "train_on": "all"}
    out = run(batch, tokenizer, "chat", **flags)
    assert [tokenizer.decode(i) for i in out["input_ids"]] == ["hiyo?</s>", "hiyo!</s>"]


# --- options -------------------------------------------------------------------------------------------


def test_train_on_last_response_and_all(tokenizer):
    convo = [HI_YO + [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]]
    every = run({"messages": convo}, tokenizer, "chat")
    assert trained_text(tokenizer, every) == "yo</s>b</s>"
    last = run({"messages": convo}, tokenizer, "chat", train_on="last_response")
    assert trained_text(tokenizer, last) == "b</s>" and last["input_ids"] == every["input_ids"]
    whole = run({"messages": convo}, tokenizer, "chat", train_on="all")
    # the whole rendering, as apply_chat_template tokenizes it (the template's own BOS, no second one)
    assert whole["input_ids"] == [tokenizer.apply_chat_template(convo[0], return_dict=False)]
    assert whole["labels"] == whole["input_ids"]


def test_text_formats_honour_train_on(tokenizer):
    batch = {"text": ["Q: a A: b Q: c A: d"]}
    flags = {"dataset_text_field": "text", "response_template": "A:", "instruction_template": "Q:"}
    assert trained_text(tokenizer, run(batch, tokenizer, "text", **flags)) == " b  d</s>"
    assert (
        trained_text(tokenizer, run(batch, tokenizer, "text", train_on="last_response", **flags)) == " d</s>"
    )
    io = run({"input": ["x"], "output": ["y"]}, tokenizer, "input_output", train_on="all")
    assert io["labels"] == [[X, 92, 4, 93, 2]]


def test_trl_flag_names(tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    base = [
        "--model_name_or_path",
        "m",
        "--training_data_path",
        "d.jsonl",
        "--output_dir",
        str(tmp_path / "o"),
    ]
    config = parse_config([*base, "--assistant_only_loss", "false", "--max_length", "128"])
    assert config.data.train_on == "all" and config.data.max_seq_length == 128
    config = parse_config([*base, "--completion_only_loss", "true", "--chat_template_path", str(template)])
    assert config.data.train_on == "responses" and config.data.chat_template_path == str(template)
    with pytest.raises(UserError, match="--assistant_only_loss false contradicts --train_on last_response"):
        parse_config([*base, "--assistant_only_loss", "false", "--train_on", "last_response"])
    with pytest.raises(UserError, match="either --chat_template or --chat_template_path"):
        parse_config([*base, "--chat_template", "x", "--chat_template_path", str(template)])


def test_chat_template_path_file_or_tokenizer_folder(tmp_path, tokenizer):
    folder = tmp_path / "tok"
    tokenizer.save_pretrained(folder)
    (tmp_path / "t.jinja").write_text("{{ 'T' }}", encoding="utf-8")
    assert chat.job_chat_template(DataArgs(chat_template_path=str(tmp_path / "t.jinja"))) == "{{ 'T' }}"
    assert chat.job_chat_template(DataArgs(chat_template_path=str(folder))) == tokenizer.chat_template
    with pytest.raises(UserError, match="does not exist"):
        chat.job_chat_template(DataArgs(chat_template_path=str(tmp_path / "nope.jinja")))
    # one owner: the data stage; the tokenizer loads with its own template, whatever the flags say
    from tuning.config.args import ModelArgs
    from tuning.model import load_tokenizer

    model = ModelArgs(model_name_or_path=str(folder))
    loaded = load_tokenizer(model, DataArgs(chat_template_path=str(tmp_path / "t.jinja")))
    assert loaded.chat_template == tokenizer.chat_template


def test_the_job_template_reaches_the_tokenizer_once_and_a_data_config_template_wins(tmp_path):
    """A data config's chat_template beats --chat_template for every row and for the saved tokenizer
    (before, rows read as chat data used the flag's and the saved tokenizer the config's)."""
    config = tmp_path / "data.yaml"
    rows = tmp_path / "d.jsonl"
    rows.write_text(json.dumps({"messages": HI_YO}) + "\n", encoding="utf-8")
    config.write_text(
        "dataprocessor:\n  type: default\n  chat_template: \"{% for m in messages %}[{{ m['content'] }}]"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
        '{% if add_generation_prompt %}[{% endif %}"\n'
        f"datasets:\n  - name: d\n    data_paths: [{rows}]\n",
        encoding="utf-8",
    )
    tok = build_tokenizer()  # its own: the job's template is written onto it
    args = DataArgs(data_config_path=str(config), chat_template="{{ 'flag' }}")
    data = build_datasets(args, tok, 64, (tok.eos_token_id,))
    assert tok.chat_template.startswith("{% for m in messages %}[")
    ids = data.train[0]["input_ids"]
    assert tok.decode(ids) == "[hi][yo]</s>"  # the config's template, not the flag's
    trained = [t for t in data.train[0]["labels"] if t != X]
    assert tok.decode(trained) == "yo]</s>"


def test_render_budget_leaves_later_turns_untrained_and_counts_them(tokenizer, caplog):
    convo = HI_YO + [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    out = run({"messages": [convo]}, tokenizer, "chat", chat_render_budget=1)
    assert trained_text(tokenizer, out) == "yo</s>"  # the first turn is always rendered
    assert out["chat_sample"] == [[0, 1, 1]]  # one turn over the budget


# --- the seam check on tokens -------------------------------------------------------------------------

# "U:" user turns, "A:" the generation prompt and the assistant header; an answer starting with a newline
# merges with the prompt's ":" into ":\n" (100) when the two are tokenized together.
SEAM = (
    "{% for m in messages %}{% if m['role'] == 'user' %}U:{{ m['content'] }}\n{% else %}A:{{ m['content'] }}"
    "{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
)


def test_a_token_merged_across_the_seam_is_split_at_the_context(tokenizer):
    """At inference the context is tokenized alone (its last token ":" = 30), and the model generates the
    answer's "\\n" as a token of its own: the sample is the context's tokens, then the answer's, never the
    merged ":\\n" a single tokenization of the text would give."""
    convo = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "\nyes"},
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": "\nno"},
    ]
    out = run({"messages": [convo]}, tokenizer, "chat", chat_template=SEAM)
    # turn 1 cannot share the sample of turn 3 (merged there): two samples
    assert out["input_ids"] == [
        [57, 30, 76, 77, 3, 37, 30, 3, 93, 73, 87, 2],  # U:hi\nA: | \nyes</s>
        # U:hi\nA:\nyes</s>U:ok\nA: (the history re-tokenized, ":\n" merged, as at inference) | \nno</s>
        [57, 30, 76, 77, 3, 37, 100, 93, 73, 87, 2, 57, 30, 83, 79, 3, 37, 30, 3, 82, 83, 2],
    ]
    assert out["labels"] == [[X] * 7 + [3, 93, 73, 87, 2], [X] * 18 + [3, 82, 83, 2]]
    assert out["chat_sample"] == [[0, 2, 0], [1, 2, 0]]


def test_conversation_without_assistant_turn_is_dropped_and_counted(tmp_path, tokenizer, caplog):
    rows = [{"messages": HI_YO}, {"messages": [{"role": "user", "content": "alone"}]}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        ds, _, stats = prepare_path(str(path), encoding_context(DataArgs(), tokenizer, 512, ()))
    assert len(ds) == 1 and stats.dropped == {chat.NO_ASSISTANT: 1}
    assert "dropped 1 of 2 rows (no assistant turn)" in caplog.text
    only_user = write_jsonl(tmp_path / "u.jsonl", rows[1:])
    with pytest.raises(UserError, match="none of the 1 conversations has an assistant turn"):
        prepare_path(str(only_user), encoding_context(DataArgs(), tokenizer, 512, ()))


def test_template_errors_are_user_errors(tokenizer):
    strict = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}{% endfor %}"
    # the conversation rendered when it failed (the context of the first assistant turn), clipped
    with pytest.raises(
        UserError, match=r"^the chat template refused the data on row .*\"system\".*no system role"
    ):
        run(
            {"messages": [[{"role": "system", "content": "s"}, *HI_YO]]},
            tokenizer,
            "chat",
            chat_template=strict,
        )


# --- preview ------------------------------------------------------------------------------------------

REWRITES = (
    "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}[old]"
    "{% else %}{{ m['content'] }}{% endif %}{% endfor %}{% if not add_generation_prompt %}{{ eos_token }}{% endif %}"
)


def test_preview_shows_the_samples_a_conversation_becomes(tmp_path, tiny_model_dir, capsys):
    convo = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * 2
    data = write_jsonl(tmp_path / "c.jsonl", [{"messages": convo}])
    argv = [
        "--model_name_or_path", str(tiny_model_dir), "--training_data_path", str(data),
        "--chat_template", REWRITES,
    ]  # fmt: skip
    assert preview.main(argv) == 0
    out = capsys.readouterr().out
    assert "2 samples from 1 of 1 rows kept; 1 conversations split into 2 samples" in out
    assert "-- sample 0: 3 tokens, 2 trained (part 1 of 2 of one conversation)\na[[b</s>]]" in out
    assert "-- sample 1: 9 tokens, 2 trained (part 2 of 2 of one conversation)\na[old]a[[b</s>]]" in out


def test_stop_tokens_enter_once_and_a_missing_context_fails_at_the_call(tokenizer):
    """The model's stop tokens reach chat encoding through the job's encoding context only, which has no
    default for them: the old call shapes that fell back to no stop tokens are TypeErrors now."""
    from tuning.data.handlers.chat import tokenize_and_apply_chat_template_with_masking as chat_masking

    batch = {"messages": [HI_YO]}
    with pytest.raises(TypeError):  # the loose parameters of before, without settings
        process_batch(batch, fmt="chat", args=DataArgs(), tokenizer=tokenizer, max_len=64)
    with pytest.raises(TypeError):
        encoding_context(DataArgs(), tokenizer, 64)
    with pytest.raises(TypeError):
        chat.ChatSettings()
    with pytest.raises(TypeError):
        chat.settings_from_args(DataArgs())
    with pytest.raises(TypeError):
        chat_masking(batch, tokenizer=tokenizer, chat_template=None)
    # what they dropped: a turn ends at the model's stop token <|end|> (not the tokenizer's EOS)
    tok = build_tokenizer()
    tok.add_tokens(["<|end|>"], special_tokens=True)
    template = (
        "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}<|end|>{% endif %};{% endfor %}{% if add_generation_prompt %}a:{% endif %}"
    )
    args = DataArgs(chat_template=template)
    stop = tok.convert_tokens_to_ids("<|end|>")
    with_stop = process_batch(batch, fmt="chat", ctx=encoding_context(args, tok, 64, (stop,)))
    without = process_batch(batch, fmt="chat", ctx=encoding_context(args, tok, 64, ()))
    assert trained_text(tok, with_stop) == "yo<|end|>"
    assert trained_text(tok, without) == "yo<|end|>;"  # the template's separator, never generated
