"""moecl: continual learning of CLIP with Mixture-of-Experts adapters."""
