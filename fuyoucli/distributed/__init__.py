"""Beyond one machine: the same recipe on several GPUs or processes.

deepspeed_config (pure: recipe + plan + profile -> a DeepSpeed config and why each key was chosen),
launch (the `deepspeed` / local process launchers), deepspeed_train (the entry point DeepSpeed's
launcher runs), deepspeed_export (a ZeRO checkpoint as a Hugging Face folder), zo_parallel and
zo_run (data-parallel zeroth-order training over torch.distributed: only scalars are exchanged).
"""
