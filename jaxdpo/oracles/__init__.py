"""Preference oracles: given prompts and two responses each, say which response is preferred.

Every oracle takes `PairRequest`s and returns `Preferences` (`Oracle.label`); oracles that can rate
one response (`can_score`) also serve evaluation (`Oracle.scores`). Score-based oracles
(`scores`) answer at once; people answer later (`AsyncOracle`: `human`, files, and Label Studio).
"""

from jaxdpo.oracles.base import (
    AsyncOracle,
    LabelsPending,
    NoPreference,
    Oracle,
    PairRequest,
    Preferences,
    Side,
    Votes,
)
from jaxdpo.oracles.human import HumanOracle, LabelFileError, read_answers
from jaxdpo.oracles.scores import (
    Mode,
    ScoreOracle,
    preferences_from_scores,
    reward_model_oracle,
    synthetic_oracle,
    torch_reward_model_oracle,
)

__all__ = [
    "AsyncOracle",
    "HumanOracle",
    "LabelFileError",
    "LabelsPending",
    "Mode",
    "NoPreference",
    "Oracle",
    "PairRequest",
    "Preferences",
    "ScoreOracle",
    "Side",
    "Votes",
    "preferences_from_scores",
    "read_answers",
    "reward_model_oracle",
    "synthetic_oracle",
    "torch_reward_model_oracle",
]
