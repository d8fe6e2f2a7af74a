"""LoRA Studio's engine: GPT-2, LoRA, data, training, generation and the adapter library.

Plain PyTorch + numpy + tiktoken + safetensors; never imports the UI.
"""
