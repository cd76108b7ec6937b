"""Which decode-step profile (superinfer.profiles) the served model gets, from
``--rota-decode-profile`` and what SGLang knows of the model and the device."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ...config import ConfigError, RotaConfig
from ...profiles import FoundProfile, find_shipped, load_profile_file
from . import compat

if TYPE_CHECKING:
    from sglang.srt.managers.scheduler import Scheduler


def served_decode_profile(scheduler: Scheduler, config: RotaConfig,
                          on_gpu: bool) -> FoundProfile | None:
    """'off': none; a path: that profile (ConfigError if it is not one); 'auto': the shipped
    profile of the model's shape, for this GPU where there is one (None for a shape without)."""
    if config.decode_profile == "off":
        return None
    if config.decode_profile != "auto":
        try:
            return load_profile_file(config.decode_profile)
        except ValueError as e:
            raise ConfigError(str(e)) from e
    hf_config = getattr(scheduler.model_config, "hf_config", None)
    if hf_config is None:
        return None
    gpu_name = (torch.cuda.get_device_name(compat.scheduler_gpu_id(scheduler)) if on_gpu
                else None)
    return find_shipped(hf_config.to_dict(), gpu_name, scheduler.server_args.tp_size)
