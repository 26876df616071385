"""potsa_training: the library that trains POTSA models (installed from the repository's training/ folder).

Data: `rows` (the canonical row), `sources` (FLEURS, manifests, `datasets`), `validation`, `sampler` (parallel
batches), `collator`, `bias_estimation`, `encoder_cache`. Loss: `alignment` (pairs), `objectives` (the OT objectives),
`layer_scheduler` / `ucb_scheduler` / `layer_scheduler_callback` (which Q-Former layer gets it), `gradient_surgery`.
Loop and reports: `arguments`, `trainer`, `run` (the stage CLI, `training/run.py`), `evaluation`, `metrics/`,
`alignment_diagnostics`, `representation_probes`, `distributed`. `tiny`: offline toy models of the real classes.
"""
