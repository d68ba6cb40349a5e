"""The built-in toy model, its server helpers, the RL demo and the soak."""
