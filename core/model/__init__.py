"""GPT-2 itself: the one table of facts (config), the network, its weights, quantised bases, the tokenizer."""
