"""maou_nb: a notebook-driven research kit for training shogi neural networks (the Maou way)."""
__version__ = "0.2.0"
