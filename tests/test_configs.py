"""Every shipped config validates, and overrides are applied and type-checked."""

from pathlib import Path

import pytest

from scproto_scale.config import CensusRunConfig, RunConfig, load_config
from scproto_scale.errors import ScprotoInputError

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    census = path.name.startswith("census_")  # pipelines/census.py configs
    cfg = load_config(path, ["train.epochs=2", "model.likelihood=zinb"],
                      model=CensusRunConfig if census else RunConfig)
    assert cfg.train.epochs == 2 and cfg.model.likelihood == "zinb"
    data = cfg.census if census else cfg.data
    assert (data.study_key if census else data.batch_key) and data.label_key


def test_override_of_an_ill_typed_value_names_the_key():
    with pytest.raises(ScprotoInputError, match=r"model\.likelihood"):
        load_config(CONFIGS[0], ["model.likelihood=poisson"])
