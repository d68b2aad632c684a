"""loraserve: a self-hostable multi-LoRA inference server."""

__version__ = "0.1.0"
