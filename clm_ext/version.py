"""The library's version, in a module of its own so that modules inside the package (and the build, which
reads it without importing torch) need not import the package root."""
__version__ = "0.1.0"
