"""Pre-training of the whole person-search model (PretrainPS hybrid learning).

``pretrain.model`` holds the NAE-style search model, ``pretrain.losses`` the OIM,
SimSiam and intra-task-alignment losses, and ``pretrain.hybrid`` composes them into
the pre-training objective L = L_ps + eta * L_con + lambda * L_adv.
"""
