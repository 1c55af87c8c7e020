"""Training methods (AST, MaskLLM, dense fine-tuning) for the shared loop of `semisparse.training`."""
