"""The reward side: reward callables, reward-model training, backbones, judges and refinement."""
