"""potsa training: data, trainer, layer scheduler, alignment loss, evaluation, and the run script."""
