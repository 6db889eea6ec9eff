"""LoRA adapters: the file formats (diffusers/PEFT, kohya/webui, SGM names; safetensors only) parsed into one
per-module form (`format`), through diffusers' own renaming of a state dict, step for step as its
`load_lora_weights` (`convert`), and the runtime that applies any mix of adapters at a per-row scale inside one
batched UNet call, fuses the default one and reads text-encoder layers (`runtime`)."""
