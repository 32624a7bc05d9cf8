"""Catalog of a LoRA library and prompt -> ranked adapters (lexical, text, preview and weight signals)."""
