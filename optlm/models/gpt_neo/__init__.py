"""GPT-Neo (Black et al. 2021): configuration and decoder."""
