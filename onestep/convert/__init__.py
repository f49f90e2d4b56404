"""Converters from other codebases' checkpoints to diffusers teacher folders that `load_teacher` reads.

python -m onestep.convert.edm_adm SRC OUT_DIR [--trust-pickle]   EDM's ADM (ImageNet-64) -> UNet2DModel + EDM
"""
