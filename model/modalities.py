"""The three kinds of sample, in the order every part of the project lists them. Kept
free of torch so data stages can import it cheaply."""

MODALITIES = ("text", "image", "pair")
