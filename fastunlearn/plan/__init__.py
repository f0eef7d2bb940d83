"""The memory plan of a run, phase by phase, and the peak of live tensor bytes it is checked against."""
