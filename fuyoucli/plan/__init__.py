"""Plan stage: from a model inventory, a recipe's workload and a hardware profile to a frozen Plan.

Pure: numbers in, dataclasses out; imports no torch (tests pass integers and compare with ==).
types.py is the contract with the engine; cost.py predicts memory and time of one placement;
search.py picks the fastest placement that fits.
"""
