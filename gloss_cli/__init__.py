"""gloss: GLoSS (generative LM + semantic search) sequential recommendation in the terminal."""

__version__ = "0.1.0"
