"""The Lightning module that trains the policy with forward-only steps (or, for comparison,
first-order ones)."""
