"""LoRA Studio's web UI (Gradio). It imports core/, never the reverse."""
