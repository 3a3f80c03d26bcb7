"""Quality gates: perplexity, and against a baseline the KL divergence and top-1 agreement."""
