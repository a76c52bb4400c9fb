"""PSDiff (diffusion person search) as a native fine-tuning method: ``python -m hybridps.finetune train
--method psdiff``.  model.py (feature extractor + stages), diffusion.py (dual noise generator,
DDIM), head.py (Collaborative Denoising Layer), losses.py (set-prediction loss), run.py (CLI)."""
