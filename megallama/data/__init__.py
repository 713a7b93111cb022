"""Data: tokenizer wrapper, indexed datasets, blending, the embedded default corpus."""
