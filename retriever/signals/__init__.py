"""Signal encoders: each turns a catalog row and a prompt into a score in [0, 1] with a reason.

- :mod:`.lexical`: FTS5/BM25 over names, trigger words, tags, descriptions;
- :mod:`.text`: prompt vs. description and trigger words, in the base pipeline's own text-encoder space;
- :mod:`.weights`: training-free, how the adapter's cross-attention key/value deltas respond to the
  prompt's token states;
- :mod:`.learned`: AutoLoRA-style weight encoder trained on the catalog's described adapters;
- :mod:`.preview`: open_clip image embedding of the preview image (only with a local open_clip model).
"""
