"""Pluggable pieces chosen by name: encoders (dense retrieval), retrievers, and LM generation backends.

Each backend imports its heavy library (torch, sentence_transformers, usearch, bm25s, llama_cpp, ctranslate2) inside the
functions that need it, so that importing this package stays cheap.
"""
