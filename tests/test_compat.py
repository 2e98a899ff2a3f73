"""Pins every private name of a library that ``tuning/compat/`` uses: each test checks the behaviour we
rely on through the compat function, and fails saying which library changed what, and which compat
module to update (then only that module, and this test). ``transformers.Trainer``'s private methods are
pinned by tests/test_hf_private.py."""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import re

import pytest
import torch

from tuning.compat import accelerate as accelerate_private
from tuning.compat import argparse as argparse_private
from tuning.compat import datasets as datasets_private
from tuning.compat import deepspeed as deepspeed_private
from tuning.compat import torch as torch_private
from tuning.compat import transformers as hf


def changed(library: str, what: str) -> str:
    return f"{library} changed {what}: update tuning/compat/{library}.py"


def test_transformers_compiles_chat_templates_in_its_sandbox_with_the_generation_tag():
    compiled = hf.compile_jinja_template("{% generation %}{{ x }}{% endgeneration %}!")
    assert compiled.render(x=1) == "1!", changed("transformers", "_compile_jinja_template")
    with pytest.raises(Exception, match="unsafe|access"):  # its sandbox refuses attribute escapes
        hf.compile_jinja_template("{{ x.__class__.__mro__ }}").render(x=1)


def test_transformers_config_carries_the_attention_implementation_it_runs():
    from transformers import LlamaConfig

    assert hf.attn_implementation(LlamaConfig(attn_implementation="eager")) == "eager", changed(
        "transformers", "config._attn_implementation"
    )


def test_transformers_model_classes_declare_their_attention_support():
    from transformers import GptOssForCausalLM, LlamaForCausalLM

    for name in ("_supports_sdpa", "_supports_flash_attn", "_compatible_flash_implementations"):
        assert hasattr(LlamaForCausalLM, name), changed("transformers", f"PreTrainedModel.{name} (gone)")
    assert hf.attention_support(LlamaForCausalLM) == (True, True, [])
    sdpa, flash, kernels = hf.attention_support(GptOssForCausalLM)
    assert (sdpa, flash) == (False, True) and "kernels-community/vllm-flash-attn3" in kernels, changed(
        "transformers", "gpt-oss's declared attention support"
    )


def test_transformers_keep_in_fp32_modules_and_name_or_path(tmp_path):
    from transformers import AutoConfig, LlamaConfig, T5ForConditionalGeneration

    assert hf.keep_in_fp32_modules(T5ForConditionalGeneration) == ["wo"], changed(
        "transformers", "_keep_in_fp32_modules"
    )
    LlamaConfig(hidden_size=8, num_attention_heads=2).save_pretrained(tmp_path)
    assert hf.name_or_path(AutoConfig.from_pretrained(tmp_path)) == str(tmp_path), changed(
        "transformers", "config._name_or_path"
    )


def test_transformers_models_list_their_never_split_layer_classes():
    from transformers import LlamaForCausalLM

    assert hf.no_split_modules(LlamaForCausalLM) == ["LlamaDecoderLayer"], changed(
        "transformers", "PreTrainedModel._no_split_modules"
    )
    holder = type("Holder", (), {})()
    hf.set_no_split_modules(holder, ["A"])
    assert hf.no_split_modules(holder) == ["A"]


def test_transformers_decoders_hand_position_ids_to_the_mask_builders_or_not():
    """Llama's decoder builds its mask from position_ids (padding-free batches exact with sdpa); gpt-oss's
    does not (transformers 5.24-5.25): the padding-free choice depends on reading it right."""
    from transformers import LlamaModel
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssModel

    source = inspect.getsource(LlamaModel.forward)
    assert any(b in source for b in hf.MASK_BUILDERS), changed(
        "transformers", "how LlamaModel builds its mask"
    )
    assert hf.mask_reads_position_ids(LlamaModel.__new__(LlamaModel)) is True
    assert hf.mask_reads_position_ids(GptOssModel.__new__(GptOssModel)) is False, changed(
        "transformers", "GptOssModel's mask (it may read position_ids now: padding-free could be exact)"
    )


def test_accelerate_partial_state_shares_its_distributed_type():
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    PartialState()
    shared = getattr(PartialState, "_shared_state", None)
    assert isinstance(shared, dict) and "distributed_type" in shared, changed(
        "accelerate", "PartialState._shared_state"
    )
    before = shared["distributed_type"]
    try:
        accelerate_private.set_shared_distributed_type(DistributedType.FSDP)
        assert PartialState().distributed_type == DistributedType.FSDP
    finally:
        shared["distributed_type"] = before


def test_datasets_keeps_the_row_order_of_a_shuffle_as_an_indices_table():
    import datasets

    ds = datasets.Dataset.from_dict({"a": list(range(5))})
    assert datasets_private.indices_table(ds) is None
    shuffled = ds.shuffle(seed=0)
    table = datasets_private.indices_table(shuffled)
    assert table is not None, changed("datasets", "Dataset._indices (gone after shuffle)")
    order = table.column(0).to_pylist()
    assert [ds[i]["a"] for i in order] == shuffled["a"], changed("datasets", "Dataset._indices' meaning")


def test_torch_adamw_step_counter_dtype():
    param = torch.nn.Parameter(torch.zeros(2))
    param.grad = torch.ones(2)
    optimizer = torch.optim.AdamW([param])
    optimizer.step()
    assert optimizer.state[param]["step"].dtype == torch_private.optimizer_step_dtype(), changed(
        "torch", "torch.optim.optimizer._get_scalar_dtype"
    )


def test_torch_default_store_reaches_every_rank(tmp_path):
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        default = torch_private.default_store()
        default.set("tuning/probe", "1")
        assert default.check(["tuning/probe"]) and default.get("tuning/probe") == b"1", changed(
            "torch", "torch.distributed.distributed_c10d._get_default_store"
        )
    finally:
        dist.destroy_process_group()


def test_argparse_lists_actions_and_converts_like_the_command_line():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, choices=[1, 2])
    (_, n) = argparse_private.actions(parser)
    assert n.dest == "n", changed("argparse", "ArgumentParser._actions")
    assert argparse_private.convert(parser, n, "2") == 2
    with pytest.raises(argparse.ArgumentError, match="invalid choice"):
        argparse_private.convert(parser, n, "3")
    with pytest.raises(argparse.ArgumentError, match="invalid int value"):
        argparse_private.convert(parser, n, "x")
    parser.add_argument("--no_n", dest="n", action="store_false")
    assert argparse_private.is_store_false(argparse_private.actions(parser)[-1]), changed(
        "argparse", "_StoreFalseAction"
    )
    assert not argparse_private.is_store_false(n)


def test_argparse_prints_groups_in_the_order_of_its_group_list():
    parser = argparse.ArgumentParser(prog="p")
    parser.add_argument("--train_flag")
    group = parser.add_argument_group("own options")
    group.add_argument("--own")
    argparse_private.put_group_first(parser, group, "training flags")
    text = parser.format_help()
    assert text.index("own options:") < text.index("training flags:") < text.index("\n  --train_flag"), (
        changed("argparse", "_action_groups / _optionals")
    )


def test_argparse_hooks_our_parser_overrides_are_still_called():
    """tuning/config/parser.py's ArgumentParser subclass overrides ``_check_value`` (a did-you-mean for
    choices) and sets ``_negative_number_matcher`` (``-1e-5`` is a value, not a flag)."""
    from tuning.config import build_parser

    source = inspect.getsource(argparse.ArgumentParser)
    assert "self._check_value(" in source, changed("argparse", "the _check_value hook (no longer called)")
    assert re.search(r"self\._negative_number_matcher\b", source), changed(
        "argparse", "_negative_number_matcher"
    )
    assert build_parser().parse_args(["--learning_rate", "-1e-5"]).learning_rate == -1e-5


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
def test_deepspeed_engine_keeps_its_parsed_config():
    from deepspeed.runtime import engine

    assert "self._config = " in inspect.getsource(engine.DeepSpeedEngine), changed(
        "deepspeed", "DeepSpeedEngine._config"
    )
    assert deepspeed_private.zero_config(None) is None


@pytest.mark.skipif(importlib.util.find_spec("clearml") is None, reason="clearml is not installed")
def test_clearml_task_reads_whether_to_fork_its_reporter_from_one_class_attribute():
    from clearml import Task
    from clearml.utilities.process import mp

    assert hasattr(Task, "_report_subprocess_enabled"), changed("clearml", "Task._report_subprocess_enabled")
    # the forked reporter starts where BackgroundMonitor reads that attribute
    assert "task._report_subprocess_enabled" in inspect.getsource(mp.BackgroundMonitor.start_all), changed(
        "clearml", "where BackgroundMonitor decides to fork"
    )
