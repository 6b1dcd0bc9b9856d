"""RL objectives and rollouts: RLOO advantages, the clipped surrogate, sampling and log-probs."""
