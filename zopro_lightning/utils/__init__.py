"""Small helpers shared across the package: distributed collectives, checkpoint I/O, memory."""
