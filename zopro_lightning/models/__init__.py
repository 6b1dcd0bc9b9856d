"""Loading and building causal LMs, sequence classifiers and tokenizers."""
