"""edgevlm: prune, quantize, export and benchmark vision-language models for the edge."""

__version__ = "0.1.0"
