"""lora_trainer: LoRA on Qwen3.5 with megatron-core parallelism, exporting PEFT adapters."""
