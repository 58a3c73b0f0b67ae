"""Kernels: the CPU arithmetic that the engine runs and the hardware profile times (torch only; imports
nothing of fuyou's but its own), so that the rate a plan prices is the rate of the code that runs."""
