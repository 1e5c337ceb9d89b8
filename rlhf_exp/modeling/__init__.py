"""Models: loading any causal LM or reward model through `from_pretrained` (models), LoRA, the
locally built tiny families (tiny_models), and real models fetched from the package registry
(model_cache, fetch)."""
