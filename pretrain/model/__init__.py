"""NAE-style person-search model (CONTRACTS section 4)."""
from hybridps.pretrain.model.backbones import BACKBONES, BackboneParts, build_backbone
from hybridps.pretrain.model.config import ModelConfig, tiny_config
from hybridps.pretrain.model.search_model import SearchModel, build_search_model

__all__ = ["ModelConfig", "tiny_config", "SearchModel", "build_search_model", "build_backbone",
           "BackboneParts", "BACKBONES"]
