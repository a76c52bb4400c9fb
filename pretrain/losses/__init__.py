"""Pre-training losses: OIM (re-ID), SimSiam consistency, intra-/inter-task alignment."""
from hybridps.pretrain.losses.iam import (GradientReversal, InterTaskAlignment, IntraTaskAlignment,
                                 consistency_loss, domain_ce, grad_reverse)
from hybridps.pretrain.losses.fc import FCLoss, fc_target_logits
from hybridps.pretrain.losses.oim import OIMLoss
from hybridps.pretrain.losses.simsiam import PredictionMLP, negative_cosine, output_std, simsiam_loss
from hybridps.pretrain.losses.ugas import self_distillation, table_logits, uncertainty_weighted

__all__ = ["OIMLoss", "PredictionMLP", "negative_cosine", "simsiam_loss", "output_std",
           "GradientReversal", "grad_reverse", "IntraTaskAlignment", "InterTaskAlignment",
           "domain_ce", "consistency_loss", "FCLoss", "fc_target_logits", "uncertainty_weighted",
           "self_distillation", "table_logits"]
