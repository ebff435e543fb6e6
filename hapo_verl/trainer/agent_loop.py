"""Agent loop that adds the previous step's entropy statistics to each generation request.

The trainer attaches ``hapo_sampling_args`` (flat ``hapo_*`` floats, see
:func:`hapo_verl.sampling.request.parse_adaptive_temperature_args`) to training batches; verl passes batch
fields to the agent loop as keyword arguments. They go into the request's ``sampling_params["extra_args"]``,
where the vLLM logits processor or the CPU rollout read them. Validation batches never carry them.
"""

from __future__ import annotations

from typing import Any

from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop

SAMPLING_ARGS_FIELD = "hapo_sampling_args"
AGENT_LOOP_NAME = "hapo_single_turn"


def add_sampling_args(sampling_params: dict[str, Any], hapo_args: dict | None) -> dict[str, Any]:
    """Return sampling params with the HAPO keys merged into ``extra_args`` (a copy; greedy requests unchanged)."""
    if not hapo_args or float(sampling_params.get("temperature", 1.0) or 0.0) == 0.0:
        return sampling_params
    extra = dict(sampling_params.get("extra_args") or {})
    extra.update(hapo_args)
    return {**sampling_params, "extra_args": extra}


class HAPOSingleTurnAgentLoop(SingleTurnAgentLoop):
    async def run(self, sampling_params: dict[str, Any], **kwargs):
        hapo_args = kwargs.pop(SAMPLING_ARGS_FIELD, None)
        if hasattr(hapo_args, "data"):  # NonTensorData
            hapo_args = hapo_args.data
        output = await super().run(add_sampling_args(sampling_params, hapo_args), **kwargs)
        output.extra_fields["hapo_stats_sent"] = bool(hapo_args)
        return output
