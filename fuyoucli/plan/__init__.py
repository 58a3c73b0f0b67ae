"""Plan stage: from a model inventory, a workload, a machine and options (all data) to a frozen Plan.

Pure: numbers in, dataclasses out; imports no torch, no recipe, no hardware profile, reads no file
(train.plan_inputs builds its inputs). types.py is the contract with the engine; memory.py and
step_time.py are the cost model's two halves (cost.py puts them together for one placement);
search.py picks the fastest placement that fits and assembles the Plan; explain.py says why a run
does not fit and what would; schedule.py turns a pass over the blocks into its operations.
"""
