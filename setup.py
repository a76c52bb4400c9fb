"""Package layout: the source folders data_prep/, pretrain/, checkpoints/ and finetune/
install as hybridps.data_prep, hybridps.pretrain, ... (metadata is in pyproject.toml)."""
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
PARTS = ("data_prep", "pretrain", "checkpoints", "finetune")

package_dir = {"hybridps": "hybridps"}
packages = ["hybridps"]
for part in PARTS:
    for init in sorted((ROOT / part).rglob("__init__.py")):
        rel = init.parent.relative_to(ROOT)
        name = "hybridps." + ".".join(rel.parts)
        packages.append(name)
        package_dir[name] = rel.as_posix()

# the YAML config folders ship as data-only packages (no __init__.py): named here, setuptools
# installs them without its "importable data folder" deprecation warning
for part in ("pretrain", "finetune"):
    packages.append(f"hybridps.{part}.configs")
    package_dir[f"hybridps.{part}.configs"] = f"{part}/configs"

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"hybridps.pretrain.configs": ["*.yaml"], "hybridps.finetune.configs": ["*.yaml"],
                  "hybridps.checkpoints": ["*.json"]},
)
