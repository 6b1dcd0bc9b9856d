"""The forward-only core: SPSA steps, perturbation samplers, counter-based draws and the
zeroth-order update rules (plain tensor code, no Lightning)."""
