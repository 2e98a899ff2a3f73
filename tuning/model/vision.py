"""Image-text models (docs/vision.md): which configs are image-text, the processor (also without
torchvision), and the vision tower and projector frozen unless asked.

transformers 5 builds a video processor (which needs torchvision) inside the processors of video-capable
families (Qwen2.5-VL, Qwen3-VL), and torchvision wheels must match the installed torch build exactly.
Image+text SFT never uses the video part, so when torchvision is missing the processor is built from its
image processor (the PIL one), tokenizer and chat template, with no video processor: the image path is
the same code either way.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from tuning.compat import transformers as hf
from tuning.config import DataArgs, ModelArgs
from tuning.errors import UserError, first_line

logger = logging.getLogger(__name__)

# Submodule names of the projector from image features to the language model, per family: LLaVA /
# LLaVA-Next / Gemma 3 / Mllama ``multi_modal_projector``, Idefics3 / SmolVLM ``connector``, Qwen2.5-VL /
# Qwen3-VL ``merger`` (inside ``visual``), Qwen3-VL's ``deepstack_merger_list``.
PROJECTOR_NAMES = ("multi_modal_projector", "connector", "merger", "deepstack_merger_list", "mm_projector")


def is_image_text(config: PretrainedConfig) -> bool:
    """Whether ``AutoModelForImageTextToText`` loads this config (LLaVA, Qwen2.5-VL, Mllama, ...)."""
    return getattr(config, "model_type", None) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def load_processor(model_args: ModelArgs, data_args: DataArgs) -> Any:
    """The model's processor (tokenizer, image processor, chat template: its own, else its tokenizer's;
    the job's ``--chat_template`` or data config template is applied by the data stage)."""
    if data_args.add_special_tokens:
        raise UserError(
            "--add_special_tokens is not supported for image-text models yet (the processor's tokenizer and "
            "image tokens would drift apart); drop it"
        )
    processor = processor_from(
        model_args.tokenizer_name_or_path or model_args.model_name_or_path, model_args.trust_remote_code
    )
    if "mllama" in type(processor).__name__.lower():
        # Mllama reads images through cross-attention; its per-token cross_attention_mask is not built
        # by our collator yet, and training without it would teach the model to ignore the images
        raise UserError(
            "Llama 3.2 Vision (Mllama) is not supported for image+text training yet (its cross-attention "
            "mask is not built); see docs/vision.md for the supported families"
        )
    if not getattr(processor, "chat_template", None):
        processor.chat_template = processor.tokenizer.chat_template
    return processor


def processor_from(name: str, trust_remote_code: bool = False) -> Any:
    """``AutoProcessor`` of ``name``, built without its video part when torchvision is missing; a
    processor without an image processor is a user error."""
    from transformers import AutoProcessor  # processor classes load only for image-text runs

    try:
        try:
            processor = AutoProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
        except ImportError as e:
            if "torchvision" not in str(e).lower():
                raise
            processor = image_only_processor(name, trust_remote_code)
    except (OSError, ValueError, ImportError) as e:
        raise UserError(f"cannot load an image-text processor from {name}: {first_line(e)}") from None
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise UserError(
            f"{name} has no image processor ({type(processor).__name__}); image+text training needs a "
            "processor with one (preprocessor_config.json)"
        )
    return processor


def model_auto_class(config: PretrainedConfig) -> Any:
    """The Auto class that loads ``config``: ``AutoModelForImageTextToText`` for image-text models,
    ``AutoModelForCausalLM`` otherwise."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if is_image_text(config) else AutoModelForCausalLM


def lora_exclusions(model: Any, user: list[str] | None) -> str | list[str] | None:
    """``exclude_modules`` for LoRA: the user's names, and every module of the frozen vision parts (a
    regular expression over full module names, which is how peft takes prefixes)."""
    frozen = getattr(model, "tuning_frozen_modules", None)
    if not frozen:
        return user
    parts = [rf"{re.escape(name)}(\..*)?" for name in frozen]
    parts += [rf"(.*\.)?{re.escape(name)}" for name in user or []]
    return "|".join(parts)


def image_only_processor(name: str, trust_remote_code: bool = False) -> Any:
    """The model's processor class built from its image processor, tokenizer and chat template, with no
    video processor (see the module docstring)."""
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import processor_class_from_name

    config = _folder_json(name, "processor_config.json") or {}
    preprocessor = _folder_json(name, "preprocessor_config.json") or {}
    class_name = config.get("processor_class") or preprocessor.get("processor_class")
    cls = processor_class_from_name(class_name) if class_name else None
    if cls is None:
        raise ValueError(
            f"no processor class named in {name} (processor_config.json / preprocessor_config.json)"
        )

    class ImageOnly(cls):  # accepts None for the video processor; everything else is the model's class
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument is None and "video" in argument_name:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    ImageOnly.__name__ = ImageOnly.__qualname__ = cls.__name__
    parts = {
        "image_processor": AutoImageProcessor.from_pretrained(name, trust_remote_code=trust_remote_code),
        "tokenizer": AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code),
    }
    parts.update({a: None for a in cls.get_attributes() if a not in parts})
    template = _chat_template(name) or parts["tokenizer"].chat_template
    kwargs = {k: v for k, v in config.items() if k != "processor_class"}
    logger.info("torchvision is not installed: %s built without its video processor", cls.__name__)
    return ImageOnly(**parts, chat_template=template, **kwargs)


def _folder_json(name: str, filename: str) -> dict | None:
    from transformers.utils import cached_file

    try:
        path = cached_file(name, filename)
    except OSError:
        return None
    return json.loads(Path(path).read_text(encoding="utf-8")) if path else None


def _chat_template(name: str) -> str | None:
    from transformers.utils import cached_file

    for filename in ("chat_template.jinja", "chat_template.json"):
        try:
            path = cached_file(name, filename)
        except OSError:
            continue
        if path:
            text = Path(path).read_text(encoding="utf-8")
            return json.loads(text)["chat_template"] if filename.endswith(".json") else text
    return None


def save_processor(processor: Any, folder: str | Path) -> None:
    """The processor's files (tokenizer, image processor config, chat template) in ``folder``, so that
    ``AutoProcessor.from_pretrained`` loads it; a processor built without its video part is saved part
    by part (transformers' own save requires every part)."""
    if all(getattr(processor, a, None) is not None for a in processor.get_attributes()):
        processor.save_pretrained(str(folder))
        return
    processor.tokenizer.save_pretrained(str(folder))
    processor.image_processor.save_pretrained(str(folder))
    if processor.chat_template:
        (Path(folder) / "chat_template.jinja").write_text(processor.chat_template, encoding="utf-8")
    # what AutoProcessor reads to pick the processor class
    config = {"processor_class": type(processor).__name__}
    (Path(folder) / "processor_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


# --- what trains ----------------------------------------------------------------------------------


def vision_prefixes(model: Any) -> dict[str, list[str]]:
    """Module names of the vision tower and the projector: the parts outside the language model and the
    output head, the projector's named by :data:`PROJECTOR_NAMES` (also inside the tower: Qwen's merger)."""
    base = getattr(model, "get_base_model", lambda: model)()
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    text = {id(m) for m in (decoder, base.get_output_embeddings()) if m is not None}
    names = dict(base.named_modules())
    text_names = [n for n, m in names.items() if id(m) in text]
    parts: dict[str, list[str]] = {"tower": [], "projector": []}
    taken: list[str] = []
    for name, module in names.items():
        if not name or any(name == t or name.startswith(t + ".") for t in text_names + taken):
            continue
        if any(id(m) in text for m in module.modules()):
            continue  # holds the language model (model.model): look inside
        if name.rsplit(".", 1)[-1] in PROJECTOR_NAMES:
            parts["projector"].append(name)
            taken.append(name)
        elif any(n.rsplit(".", 1)[-1] in PROJECTOR_NAMES for n, _ in module.named_modules() if n):
            continue  # a tower holding its projector (Qwen's visual.merger): look inside
        elif any(True for _ in module.parameters()):
            parts["tower"].append(name)
            taken.append(name)
    return parts


def present_layer_classes(model: Any) -> list[str]:
    """Keep only the ``_no_split_modules`` class names this model has. accelerate's FSDP wraps by them
    when no class is named (fixtures/accelerate_fsdp_defaults.yaml) and stops on a name it can't find:
    LLaVA lists CLIPTextEmbeddings, absent from its vision-only CLIP tower. ``_no_split_modules`` is a
    transformers attribute accelerate reads; we set it on this instance only."""
    names = {type(m).__name__ for m in model.modules()}
    listed = hf.no_split_modules(model)
    kept = [n for n in listed if n in names]
    if len(kept) != len(listed):
        hf.set_no_split_modules(model, kept)
    return kept


def freeze_vision(model: Any, args: ModelArgs) -> list[str]:
    """Freeze the vision tower and projector unless ``--freeze_vision_tower false`` /
    ``--freeze_multi_modal_projector false``; returns the frozen module names (recorded on the model as
    ``tuning_frozen_modules``, which LoRA's targets leave out)."""
    parts = vision_prefixes(model)
    frozen = (parts["tower"] if args.freeze_vision_tower else []) + (
        parts["projector"] if args.freeze_multi_modal_projector else []
    )
    base = getattr(model, "get_base_model", lambda: model)()
    modules = dict(base.named_modules())
    for name in frozen:
        for param in modules[name].parameters():
            param.requires_grad_(False)
    model.tuning_frozen_modules = frozen
    logger.info(
        "image-text model: vision tower %s, projector %s (docs/vision.md)",
        "frozen" if args.freeze_vision_tower else "trained",
        "frozen" if args.freeze_multi_modal_projector else "trained",
    )
    return frozen
