"""Before the first step: the hardware check, the model with its LoRA choice, and transformers' TrainingArguments of
a stage."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
from transformers import TrainingArguments

from llm2emb.errors import UserError
from llm2emb.model.backbone import is_peft
from llm2emb.train.distributed import is_main_process
from llm2emb.train.learning_rate import default_learning_rate
from llm2emb.train.recipe import LoraSpec, Recipe, StageSpec
from llm2emb.train.recipe_file import format_key_path

logger = logging.getLogger(__name__)


def check_hardware(quantization: str, bf16: bool, sharding: str) -> None:
    """Fail in one line, before any loading, when the recipe's `quantization`, `bf16` or `sharding` needs hardware
    this machine lacks."""
    if quantization != "none" and not torch.cuda.is_available():
        raise UserError(f"quantization: {quantization} (QLoRA through bitsandbytes) needs a CUDA GPU; "
                        "none is visible (set quantization: none to train on the CPU)")
    if bf16 and not torch.cuda.is_available() and not _cpu_supports_bf16():
        raise UserError("bf16: this CPU has no bfloat16 support; set bf16: false")
    if sharding == "fsdp" and not torch.cuda.is_available():
        # accelerate enables FSDP only for GPU (and other accelerator) processes; on CPU processes it would
        # silently fall back to DDP, which is not what the recipe asked for
        raise UserError("sharding: fsdp needs CUDA GPUs (accelerate shards only across accelerator processes); "
                        "none is visible (set sharding: none: DDP across CPU processes)")


def _cpu_supports_bf16() -> bool:
    try:
        torch.zeros(1, dtype=torch.bfloat16) @ torch.zeros(1, 1, dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True


def load_embedder(recipe: Recipe):
    """The Embedder of `model:`, with LoRA (and a 4/8-bit base for QLoRA) applied as the recipe says."""
    from llm2emb.model.embedder import Embedder

    spec = recipe.model
    dtype = spec.dtype
    if dtype == "auto":
        dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    quantization = None if recipe.quantization == "none" else recipe.quantization
    embedder = Embedder.from_pretrained(spec.base, pooling=spec.pooling, attention=spec.attention,
                                        torch_dtype=getattr(torch, dtype), quantization=quantization,
                                        causal_sink=spec.causal_sink, text_template=spec.text_template)
    embedder.config.max_length = spec.max_length
    lora = resolve_lora(recipe, embedder)
    if lora is not None:
        apply_lora(embedder, recipe, lora)
    if recipe.gradient_checkpointing:
        embedder.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora is not None:
            embedder.backbone.enable_input_require_grads()
    embedder.pooler.requires_grad_(embedder.pooler.trainable)
    if recipe.token_dim is not None:  # made before any stage runs, so a resumed or skipped stage's head loads into it
        try:
            embedder.add_token_head(recipe.token_dim)
        except UserError as exc:
            first = next(i for i, stage in enumerate(recipe.stages) if stage.late_interaction)
            key = format_key_path(("stages", first, "late_interaction", "dim"))
            raise UserError(f"{key}: {exc} ({spec.base} has one)") from None
    return embedder.train()


def resolve_lora(recipe: Recipe, embedder) -> LoraSpec | None:
    """The adapter to train, or None to train every weight; `lora: auto` is LoraSpec's adapter (see Recipe)."""
    if recipe.lora != "auto":
        return recipe.lora
    lora = LoraSpec()
    if is_main_process():
        parameters = sum(p.numel() for p in embedder.backbone.parameters())
        print(f"lora: auto -> a LoRA adapter (r {lora.r}, alpha {lora.alpha:g}, {lora.target_modules}; "
              f"{parameters / 1e6:.0f}M base parameters frozen; lora: null trains every weight)", file=sys.stderr)
    return lora


def apply_lora(embedder, recipe: Recipe, lora: LoraSpec) -> None:
    """Wrap the backbone in a PEFT LoRA model; with a quantized base, prepare it for k-bit training first."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    backbone = embedder.backbone
    if recipe.quantization != "none":
        backbone = prepare_model_for_kbit_training(
            backbone, use_gradient_checkpointing=recipe.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, bias="none")
    try:
        embedder.backbone = get_peft_model(backbone, config)
    except ValueError as exc:
        raise UserError(f"lora.target_modules: {exc}") from None


def stage_learning_rate(stage: StageSpec, index: int, embedder) -> float:
    """The stage's rate; `auto` resolves by whether the backbone trains an adapter and by its width, and says so."""
    if stage.learning_rate != "auto":
        return stage.learning_rate
    adapter = is_peft(embedder.backbone)
    hidden_size = embedder.base_config.hidden_size
    rate = default_learning_rate(adapter, hidden_size)
    if is_main_process():
        print(f"stages[{index}].learning_rate: auto -> {rate:.3g} ({'a LoRA adapter' if adapter else 'full fine-tuning'},"
              f" hidden size {hidden_size})", file=sys.stderr)
    return rate


def training_arguments(
    recipe: Recipe, stage: StageSpec, stage_dir: Path, world_size: int, learning_rate: float,
    layer_class: str | None = None,
) -> TrainingArguments:
    """The HF TrainingArguments of one stage (checked against transformers 5.23's signature).

    `learning_rate`: the stage's, resolved (stage_learning_rate). `layer_class`: the decoder layer's class name,
    FSDP's wrapping unit under `sharding: fsdp`."""
    sharding = {}
    if recipe.sharding == "fsdp":
        # FSDP2 (fully_shard; frozen LoRA bases and trained adapters share a unit): each decoder layer a unit,
        # resharded after forward; saves gather a full state dict (Trainer passes it to `_save`)
        sharding = {"fsdp": "full_shard auto_wrap",
                    "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": [layer_class],
                                    "reshard_after_forward": True, "state_dict_type": "FULL_STATE_DICT"}}
    return TrainingArguments(
        **sharding,
        output_dir=str(stage_dir),
        max_steps=stage.max_steps,
        per_device_train_batch_size=stage.batch_size // world_size,
        learning_rate=learning_rate,
        lr_scheduler_type=stage.lr_scheduler,
        warmup_steps=stage.warmup_step_count,
        weight_decay=stage.weight_decay,
        max_grad_norm=stage.max_grad_norm,
        bf16=recipe.bf16,
        logging_steps=recipe.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=recipe.save_steps,
        save_total_limit=recipe.save_total_limit,
        seed=recipe.seed,
        report_to=[name for name in available_reporters(recipe.report_to) if name != "tensorboard"] or ["none"],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        # a recipe's batch_size is the global contrastive batch: each process gets a slice of the same batch
        accelerator_config={"split_batches": True},
        ddp_find_unused_parameters=False,
        use_cpu=not torch.cuda.is_available(),
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=False,
    )


def available_reporters(wanted: list[str]) -> list[str]:
    """Trainer integrations that are installed; tensorboard is optional."""
    import importlib.util

    modules = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
    kept = [name for name in wanted if name != "none" and importlib.util.find_spec(modules.get(name, name)) is not None]
    for name in set(wanted) - set(kept) - {"none"}:
        logger.warning("report_to: %s is not installed; not reporting to it", name)
    return kept
