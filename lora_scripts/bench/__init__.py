"""`lora-scripts bench`: how fast our training step is, where its time goes, and how it compares with a
reference loop written like diffusers' `train_text_to_image_lora.py` (docs/performance.md)."""
