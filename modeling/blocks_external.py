"""Blocks from outside hybridzoo that a saved model uses. Empty here; `save_pretrained` writes the saved folder's copy
of this file when the model has such blocks (see `blocks.ship_external_blocks`)."""

EXTERNAL_BLOCKS: list = []
