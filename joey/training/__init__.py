"""Self-distillation for joey's draft components: prompts → target answers → adapter training."""
