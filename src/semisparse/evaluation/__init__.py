"""Evaluation of (sparse) language models: perplexity on a token stream."""
