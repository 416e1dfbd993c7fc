"""Environments for multi-turn RL: the :class:`Environment` protocol, tool calling and the episode runner.

- :mod:`~llm_trainer.envs.base`: the protocol (``reset(record) -> messages``, ``step(text) -> (observation |
  None, reward, done)``), :class:`StepResult`, :class:`EnvironmentFailure`;
- :mod:`~llm_trainer.envs.tool_calls`: tool calls in the chat template's own syntax (Hermes/Qwen, Llama 3 JSON);
- :mod:`~llm_trainer.envs.tools`: Python functions as tools, run in a child process with time and output limits;
- :mod:`~llm_trainer.envs.tool_env`: :class:`ToolEnvironment`;
- :mod:`~llm_trainer.envs.turns`: environment turns as token ids appended to the trajectory (never re-tokenised);
- :mod:`~llm_trainer.envs.episodes`: playing episodes in generation batches that mix turns;
- :mod:`~llm_trainer.envs.calculator`: a task that needs a tool (big-number addition with a calculator).

The trainers take ``environment=`` (a factory: a class or a zero-argument callable), see docs/rl.md.
"""
from llm_trainer.envs.base import Environment, EnvironmentFailure, StepResult
from llm_trainer.envs.episodes import Episode, EpisodeLimits, Turn, play, run_episodes, start_episodes
from llm_trainer.envs.tool_calls import ParsedReply, ToolCall, detect_format, parse_tool_calls
from llm_trainer.envs.tool_env import ToolEnvironment
from llm_trainer.envs.tools import Tool, ToolResult, ToolRunner
from llm_trainer.envs.turns import Appended, TurnEncoder

__all__ = ["Environment", "EnvironmentFailure", "StepResult", "Episode", "EpisodeLimits", "Turn", "run_episodes", "start_episodes", "play",
           "ParsedReply", "ToolCall", "detect_format", "parse_tool_calls", "ToolEnvironment", "Tool", "ToolResult",
           "ToolRunner", "Appended", "TurnEncoder"]
