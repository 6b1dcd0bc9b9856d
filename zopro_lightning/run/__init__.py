"""The run: phases, run state, console, loggers, export and the command-line entry points."""
