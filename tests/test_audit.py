"""The data audit (docs/data.md, "Audit"): counts against hand-computed ones, the gates from the command
line and from a --config file, rows vs samples, and the HTML page in a real headless Chromium.

The tiny tokenizer (tuning/testing/tiny_model.py) is one token per character here (no merge applies to
the texts used), which is what makes the expected figures countable by hand."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, run_cli, write_jsonl

from tuning import cli
from tuning.config import DataArgs, ModelArgs
from tuning.data import IMAGES, build_datasets, data_audit
from tuning.model import load_processor
from tuning.testing.tiny_model import build_tokenizer

REAL = REPO.parent / "shared" / "real-tokenizers"
# input_output rows, max_seq_length 8. Tokens are <s>, one per character, </s>; the joining space and the
# output and EOS are trained.
ROWS = [
    {"input": "ab", "output": "cd"},  # <s> a b ␣ c d </s>: 7 tokens, 4 trained
    {"input": "ab", "output": "cd"},  # the same sample again: 1 exact duplicate
    {"input": "ab", "output": ""},  # <s> a b ␣ </s>: 5 tokens, 2 trained (a space and EOS: empty text)
    {"input": "abcdab", "output": "cdab"},  # 13 tokens → 8: trains only ␣ (empty text); c d a b </s> lost
    {"input": "abcdabcd", "output": "x"},  # 12 tokens → 8, none trained: dropped; ␣ x </s> lost
]
MAX_LEN = 8


@pytest.fixture(scope="module")
def fixture_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("audit") / "rows.jsonl", ROWS)


def audit_of(path: Path, max_len: int = MAX_LEN, epochs: float | None = 2.0, **flags) -> dict:
    args = DataArgs(training_data_path=str(path), **flags)
    return data_audit(build_datasets(args, build_tokenizer(), max_len, ()), args, max_len, epochs)


def test_counts_equal_hand_computed_ones(fixture_file):
    audit = audit_of(fixture_file)
    s = audit["sources"][0]
    assert s["rows"] == {"read": 5, "removed_by_handlers": 0, "processed": 5, "kept": 4, "dropped": 1}
    assert s["samples"]["made"] == 5 and s["samples"]["kept"] == 4
    assert s["samples"]["dropped_by_reason"] == {"no_trained_token_after_truncation": 1}
    assert s["truncated"] == 1  # of the kept samples (the dropped one was truncated too)
    assert s["trained_tokens_lost_to_truncation"] == 5 + 3
    assert s["tokens"] == {"total": 7 + 7 + 5 + 8, "trained": 4 + 4 + 2 + 1, "context": 3 + 3 + 3 + 7}
    assert s["duplicate_samples"] == 1
    assert s["empty_trained_text"] == 2
    lengths = s["lengths"]
    assert (lengths["min"], lengths["median"], lengths["max"]) == (5, 7.0, 8)
    assert sum(lengths["histogram"]["counts"]) == 4
    assert s["figures"]["dropped_fraction"] == 0.2 and s["figures"]["truncated_fraction"] == 0.25
    assert s["mixing"] == {
        "train_samples": 4,
        "drawn_per_pass": 4,
        "epochs_per_pass": 1.0,
        "effective_epochs": 2.0,
    }
    assert s["chat"] is None and s["response_template"] is None
    assert audit["total"]["tokens"] == s["tokens"] and audit["trained_token_share"] == {
        str(fixture_file): 1.0
    }
    # defaults only warn: four figures past their default thresholds, none stops
    assert {(g["figure"], g["level"]) for g in audit["gates"]} == {
        ("dropped_fraction", "warn"),
        ("truncated_fraction", "warn"),
        ("duplicate_fraction", "warn"),
        ("empty_trained_fraction", "warn"),
    }


def test_response_template_found_share_and_its_drop_reason(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "xA:cd"}, {"text": "xcd"}])
    s = audit_of(path, 64, response_template="A:")["sources"][0]
    assert s["response_template"] == {"rows_found": 1, "fraction": 0.5}
    assert s["samples"]["dropped_by_reason"] == {"response_template_not_found": 1}
    assert s["tokens"] == {"total": 7, "trained": 3, "context": 4}  # <s> x A : [c d </s>]


def test_data_config_sources_mixing_and_duplicates_across_sources(tmp_path, fixture_file):
    other = write_jsonl(tmp_path / "other.jsonl", ROWS[:1] + [{"input": "ba", "output": "dc"}])
    config = tmp_path / "data.yaml"
    config.write_text(
        "datasets:\n"
        f"  - name: one\n    data_paths: [{fixture_file}]\n    sampling: 0.5\n"
        f"  - name: two\n    data_paths: [{other}]\n    sampling: 0.5\n"
    )
    args = DataArgs(data_config_path=str(config))
    data = build_datasets(args, build_tokenizer(), MAX_LEN, ())
    audit = data_audit(data, args, MAX_LEN, None)
    one, two = audit["sources"]
    assert (one["name"], two["name"]) == ("one", "two")
    assert two["rows"]["kept"] == 2 and two["duplicate_samples"] == 0
    assert audit["total"]["duplicate_samples"] == 2  # ROWS[0] twice in one, once more in two
    drawn = one["mixing"]["drawn_per_pass"] + two["mixing"]["drawn_per_pass"]
    assert drawn == len(data.train)  # every sample of the mixed set is counted to its source
    # all_exhausted with equal ratios: the smaller source is repeated until the larger one is used up
    assert one["mixing"]["epochs_per_pass"] >= 1.0 and two["mixing"]["epochs_per_pass"] > 1.0
    assert one["mixing"]["effective_epochs"] is None  # --max_steps runs have no epoch count


def test_chat_role_and_turn_breakdown_on_the_real_qwen3_template(tmp_path):
    from transformers import AutoTokenizer

    from tuning.config import parse_config
    from tuning.outputs.model_card import _training
    from tuning.preview import counts_line

    if not (REAL / "qwen3" / "tokenizer.json").is_file():
        pytest.skip(f"real Qwen3 tokenizer not in {REAL / 'qwen3'}")
    tokenizer = AutoTokenizer.from_pretrained(REAL / "qwen3")
    rows = [
        {
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello friend"},
                {"role": "user", "content": "Add 2+2"},
                {"role": "assistant", "content": "Four", "reasoning_content": "two plus two is four"},
            ]
        },
        {"messages": [{"role": "user", "content": "Say yes"}, {"role": "assistant", "content": "yes"}]},
        {"messages": [{"role": "user", "content": "Nothing"}, {"role": "assistant", "content": ""}]},
        {"messages": [{"role": "user", "content": "only user"}]},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    args = DataArgs(training_data_path=str(path))
    stop = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    data = build_datasets(args, tokenizer, 4096, stop)
    s = data_audit(data, args, 4096, 1.0)["sources"][0]
    # Qwen3 drops earlier reasoning blocks: the first conversation is two samples
    assert s["rows"]["read"] == 4 and s["rows"]["kept"] == 3
    assert s["samples"]["made"] == 5 and s["samples"]["kept"] == 4
    assert s["samples"]["conversations_split"] == 1 and s["samples"]["samples_from_split_conversations"] == 2
    assert s["samples"]["dropped_by_reason"] == {"no_assistant_turn": 1}
    chat = s["chat"]
    # turn being generated: <think> \n\n </think> \n\n (empty reasoning) + content + <|im_end|>
    first = 4 + 2 + 1  # "Hello", " friend"
    last = 1 + 1 + 5 + 1 + 1 + 1 + 1 + 1  # <think> \n "two plus two is four" \n </think> \n\n Four <|im_end|>
    only = (4 + 1 + 1) + (4 + 1)  # "yes"; the empty answer
    assert chat["trained_by_turn"] == {"first": first, "middle": 0, "last": last, "only": only, "none": 0}
    assert chat["trained_reasoning"] == 5 and chat["trained_tool_calls"] == 0
    assert chat["trained_by_role"]["assistant"] == s["tokens"]["trained"] == first + last + only
    # "You are terse." in both samples of the split conversation; the users' words; "Hello friend" as the
    # second sample's history
    assert chat["context_by_role"]["system"] == 4 * 2
    assert chat["context_by_role"]["user"] == 2 * 2 + 5 + 2 + 1  # Hi there (twice), Add 2+2, Say yes, Nothing
    assert chat["context_by_role"]["assistant"] == 2
    assert s["empty_trained_text"] == 1  # the empty answer: only template tokens and whitespace
    # rows and samples counted apart in every report (not "4 of 4 rows kept" nor "4 of 3")
    assert (
        data.stats.sample_counts() == "4 samples from 3 of 4 rows kept (1 conversations split into 2 samples)"
    )
    assert counts_line(data.stats).startswith("4 samples from 3 of 4 rows kept;")
    argv = ["--model_name_or_path", str(REAL / "qwen3"), "--training_data_path", str(path)]
    config = parse_config([*argv, "--output_dir", str(tmp_path / "out")])
    data.audit = data_audit(data, args, 4096, 1.0)
    card = _training(config, data, 4096)
    assert "3 of 4 training rows kept, made into 4 samples (1 conversations split into 2 samples)" in card
    assert "Data audit (`data_audit.html`" in card and "3 of 4 rows kept, 4 samples (1 dropped" in card

    # a tool loop: the call turn (no content, no reasoning) is all tool call; the answer after the result
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ]
    path = write_jsonl(tmp_path / "tool.jsonl", [{"messages": messages, "tools": json.dumps([weather])}])
    args = DataArgs(training_data_path=str(path))
    chat = data_audit(build_datasets(args, tokenizer, 4096, stop), args, 4096, 1.0)["sources"][0]["chat"]
    assert chat["trained_tool_calls"] == chat["trained_by_turn"]["first"] > 0
    assert chat["trained_by_turn"]["last"] == 4 + 4 + 1  # empty think block, "It is sunny.", <|im_end|>
    # "sunny" is s|unny after the newline; the question is in both samples
    assert chat["context_by_role"]["tool"] == 2 and chat["context_by_role"]["user"] == 4 * 2


GATE_CASES = {  # flag → (threshold that fails on ROWS at max_seq_length 8, the figure it names, its value)
    "max_dropped_fraction": ("0.1", "dropped_fraction 0.2"),
    "max_truncated_fraction": ("0.2", "truncated_fraction 0.25"),
    "min_trained_tokens_fraction": ("0.5", "trained_tokens_fraction 0.407407"),
    "max_duplicate_fraction": ("0", "duplicate_fraction 0.25"),
    "max_empty_trained_fraction": ("0.4", "empty_trained_fraction 0.5"),
}


@pytest.mark.parametrize("from_file", [False, True], ids=["flag", "config_file"])
@pytest.mark.parametrize("flag", list(GATE_CASES))
def test_each_gate_stops_with_exit_1_and_one_line(
    flag, from_file, fixture_file, tiny_model_dir, tmp_path, capsys
):
    value, figure = GATE_CASES[flag]
    argv = ["audit", "--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path / "out")]
    settings = {"training_data_path": str(fixture_file), "max_seq_length": MAX_LEN, flag: float(value)}
    if from_file:
        config = tmp_path / "job.json"
        config.write_text(json.dumps(settings))
        argv += ["--config", str(config)]
    else:
        argv += [x for k, v in settings.items() for x in (f"--{k}", str(v))]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: data audit: source '{fixture_file}': {figure} ")
    assert f"--{flag} {float(value):g}" in err
    assert (tmp_path / "out" / "data_audit.json").is_file()  # tuning audit writes the page it points to


def test_gate_values_are_checked_like_every_flag(fixture_file, tiny_model_dir, tmp_path, capsys):
    argv = ["audit", "--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path)]
    argv += ["--training_data_path", str(fixture_file), "--max_truncated_fraction", "1.5"]
    assert cli.main(argv) == 1
    assert "max_truncated_fraction" in capsys.readouterr().err


@pytest.mark.slow
def test_a_file_whose_every_answer_is_empty_stops_before_training(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "empty.jsonl", [{"input": f"q{i}", "output": ""} for i in range(6)])
    out = tmp_path / "out"
    args = ["--model_name_or_path", str(tiny_model_dir), "--training_data_path", str(data)]
    args += ["--output_dir", str(out), "--num_train_epochs", "1"]
    result = run_cli(args)
    assert result.returncode == 1, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: data audit: source '{data}': every trained text is empty")
    assert "--max_empty_trained_fraction 1" in line
    assert not list(out.glob("checkpoint-*")) and not (out / "data_audit.json").exists()
    # the flag lets it train anyway, and the run's outputs carry the audit and count rows vs samples
    result = run_cli([*args, "--max_empty_trained_fraction", "1", "--save_model_dir", str(out / "final")])
    assert result.returncode == 0, result.stderr[-2000:]
    audit = json.loads((out / "data_audit.json").read_text())
    assert audit["total"]["empty_trained_text"] == 6 and audit["gates"] == []
    summary = json.loads((out / "run_summary.json").read_text())
    assert (summary["rows"], summary["rows_kept"], summary["samples"], summary["samples_kept"]) == (
        6,
        6,
        6,
        6,
    )
    card = (out / "final" / "README.md").read_text()
    assert "Data audit (`data_audit.html`" in card and "6 with empty trained text" in card
    assert "data audit:" in result.stderr  # the table in the log


# --- the page in a real browser -------------------------------------------------------------------

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


def _chromium() -> str:
    """Chromium from Debian's package: installed here when running as root with the registry reachable
    (one apt-get update), else the test is skipped with the reason."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("headless Chromium is not installed (Debian package `chromium`) and this is not root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    update = subprocess.run(
        ["apt-get", "update", "-qq"], capture_output=True, text=True, env=env, timeout=300
    )
    install = subprocess.run(
        ["apt-get", "install", "-y", "-qq", "chromium"], capture_output=True, text=True, env=env, timeout=900
    )
    found = shutil.which("chromium")
    if not found:
        why = (install.stderr or update.stderr).strip().splitlines()[-1:] or ["unknown"]
        pytest.skip(f"could not install Debian's chromium package (registry unreachable?): {why[0]}")
    return found


def _load(chromium: str, page: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    command = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0"]
    return subprocess.run(
        [*command, *extra, page.as_uri()], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )


def _console_errors(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


@pytest.mark.slow  # three browser starts
def test_audit_page_loads_in_headless_chromium(fixture_file, tiny_model_dir, tmp_path):
    chromium = _chromium()
    out = tmp_path / "out"
    argv = ["audit", "--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out)]
    argv += ["--training_data_path", str(fixture_file), "--max_seq_length", str(MAX_LEN)]
    assert cli.main(argv) == 0
    page = out / "data_audit.html"
    text = page.read_text()
    assert "http://" not in text and "https://" not in text and "<script" not in text  # self-contained
    # the check for console errors catches one: a page that logs an error is reported
    broken = tmp_path / "broken.html"
    broken.write_text("<html><body><script>console.error('boom'); undefinedCall();</script></body></html>")
    assert _console_errors(_load(chromium, broken, tmp_path, "--dump-dom"))
    dom = _load(chromium, page, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert not _console_errors(dom), _console_errors(dom)
    assert '<table id="sources">' in dom.stdout and '<svg class="histogram"' in dom.stdout
    assert '<svg class="share"' in dom.stdout and "<mark>" in dom.stdout  # trained tokens highlighted
    shot = tmp_path / "audit.png"
    result = _load(chromium, page, tmp_path, f"--screenshot={shot}", "--window-size=1400,1800")
    assert result.returncode == 0 and shot.is_file() and shot.stat().st_size > 10_000, result.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("batch_rows", [1, 2, 100])
def test_counts_do_not_depend_on_the_batches_they_are_read_in(batch_rows):
    """The counters are read batch by batch (bounded memory); a conversation's samples may span two."""
    import datasets

    from tuning.data.prepare import count

    a, space = 69, 4  # tiny tokenizer ids: "a", " "
    table = {  # conversations: 2 samples (the second dropped); 1; 2 both dropped; 1 repeating the first
        "input_ids": [[1, a], [1, a, a], [space], [5, 6], [5, 6, 7], [1, a]],
        "labels": [[-100, a], [-100, -100, -100], [space], [-100, -100], [-100, -100, -100], [-100, a]],
        "status": ["ok", "no_trained_token_after_truncation", "ok", "x", "x", "ok"],
        "truncated": [False, True, False, False, False, False],
        "trained_lost": [0, 2, 0, 0, 0, 0],
        "chat_sample": [[0, 2, 0], [1, 2, 0], [0, 1, 0], [0, 2, 0], [1, 2, 0], [0, 1, 0]],
    }
    stats = count(datasets.Dataset.from_dict(table), build_tokenizer(), batch_rows=batch_rows)
    assert (stats.rows, stats.rows_kept, stats.samples, stats.kept) == (4, 3, 6, 3)
    assert stats.dropped == {"no_trained_token_after_truncation": 1, "x": 2}
    assert (stats.total_tokens, stats.trained_tokens, stats.trained_lost) == (5, 3, 2)
    assert (stats.conversations_split, stats.split_samples) == (2, 4)
    assert stats.empty_trained_text == 1  # the sample training only a space
    assert stats.duplicate_samples == 1 and len(set(stats.hashes.tolist())) == 2
    assert stats.lengths.tolist() == [2, 1, 2] and len(stats.examples) == 3


def test_image_text_samples_show_their_images_where_their_tokens_are(tmp_path):
    """``tuning audit`` on an image+text file (the real Qwen2.5-VL processor; the audit reads no weights):
    each sample's image is an inline PNG thumbnail in place of its image tokens, downscaled; an image
    that can't be read shows as a marker."""
    real = REPO.parent / "shared" / "real-processors" / "qwen2.5-vl"
    if not real.is_dir():
        pytest.skip(f"{real} is absent: the image+text audit needs ../shared/real-processors")
    pytest.importorskip("PIL", reason="image+text data needs Pillow (the `vision` extra)")
    from PIL import Image

    from tuning.outputs.audit_report import render_page

    rows = []
    for i, (name, rgb) in enumerate([("red", (200, 10, 10)), ("blue", (10, 10, 200))]):
        Image.new("RGB", (600, 300), rgb).save(tmp_path / f"img{i}.png")  # 600 px: the page shows 128
        user = [{"type": "image"}, {"type": "text", "text": "What color is this?"}]
        answer = [{"role": "assistant", "content": [{"type": "text", "text": f"It is {name}."}]}]
        rows.append({"messages": [{"role": "user", "content": user}, *answer], "images": [f"img{i}.png"]})
    rows.append({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]})
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "out"
    argv = ["audit", "--model_name_or_path", str(real), "--output_dir", str(out)]
    assert cli.main([*argv, "--training_data_path", str(data), "--max_seq_length", "512"]) == 0
    page = (out / "data_audit.html").read_text()
    samples = page.split("<p class='note'>sample ")[1:]
    assert len(samples) == 3
    for sample in samples[:2]:  # one thumbnail, inside the sample's text where <|image_pad|> was
        assert sample.count('<img src="data:image/png;base64,') == 1
        text = sample.split("<div class='sample'>")[1]
        assert text.index("&lt;|vision_start|&gt;<img") < text.index("What color") < text.index("It is")
        assert "image_pad" not in text
        uri = sample.split('src="')[1].split('"')[0]
        thumb = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
        assert thumb.size == (128, 64) and thumb.getpixel((5, 5))[:3] in {(200, 10, 10), (10, 10, 200)}
    assert "<img" not in samples[2]  # a text-only row in the same file
    assert len(page) < 40_000  # two thumbnails of a few hundred bytes, not the 600 px files
    # a file that can't be read (gone since preparing) is a marker on the page, never a crash
    processor = load_processor(ModelArgs(model_name_or_path=str(real)), DataArgs(training_data_path="x"))
    ids = processor.tokenizer("<|vision_start|><|image_pad|><|image_pad|><|vision_end|>ok")["input_ids"]
    sample = {"input_ids": ids, "labels": [-100] * (len(ids) - 1) + ids[-1:]}
    sample[IMAGES] = [{"path": str(tmp_path / "gone.png"), "bytes": None}]
    audit = json.loads((out / "data_audit.json").read_text())
    name = audit["sources"][0]["name"]
    page = render_page(audit, {name: [sample]}, processor.tokenizer, processor)
    assert "&lt;|vision_start|&gt;<span class='image'" in page and "[image: 2 tokens]" in page
    assert "<img" not in page
