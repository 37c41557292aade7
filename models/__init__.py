"""Models: loading, captioning helpers and the tiny BLIP pretraining recipe."""
