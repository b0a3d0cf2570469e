"""The library's version, in a module of its own so that modules inside the package (and the build, which
reads it without importing torch) need not import the package root."""
# 0.2.0: layers are saved in format 2 (alignment_config.json names its weights file), which 0.1.0 cannot
# read; 0.2.0 still reads 0.1.0's format 1 (clm_ext/storage.py).
__version__ = "0.2.0"
