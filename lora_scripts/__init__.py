"""lora-scripts: train Stable Diffusion LoRAs from one YAML file."""

__version__ = "0.1.0"
