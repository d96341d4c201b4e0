"""The R1 pipeline's stages besides training: built-in SFT data, rejection sampling, the stage runner."""
