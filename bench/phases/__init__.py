"""The phases of `make bench`, a module each (bench/noisy.py is the noisy-neighbour phase);
bench/run.py runs them in order."""
