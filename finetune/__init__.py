"""NAE fine-tuning of pre-trained person-search models and the standard
person-search evaluation (CUHK-SYSU, PRW, PoseTrack21).

* :mod:`finetune.evaluate` -- the protocol, vectorised; pure numpy.
* :mod:`finetune.results_io` -- the results-file format (any model's outputs).
* :mod:`finetune.datasets`, :mod:`finetune.engine`, :mod:`finetune.init` -- training.
* ``python -m hybridps.finetune {train,eval}`` -- :mod:`finetune.cli`.
"""
