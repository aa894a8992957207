"""Fine-tuning: the training methods (registry.METHODS) and the Trainer harness they share."""
