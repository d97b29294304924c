"""OPT (Zhang et al. 2022): configuration and decoder."""
