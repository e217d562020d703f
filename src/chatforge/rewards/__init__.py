"""Where step 3's reward comes from: reward models, rule functions, or both (see signal.py)."""

from .functions import RewardFunction, RewardFunctionError, check_scores, load_function, split_weight
from .signal import REWARD_STATS_FILE, Responses, RewardModel, RewardSignal, read_reward_stats

__all__ = [
    "REWARD_STATS_FILE",
    "RewardFunction",
    "RewardFunctionError",
    "RewardModel",
    "RewardSignal",
    "Responses",
    "check_scores",
    "load_function",
    "read_reward_stats",
    "split_weight",
]
