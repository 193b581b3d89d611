"""No phoning home: Flower telemetry, Flower update checks, Ray usage stats and Hugging Face telemetry
are off unless the user set the variable. Imported before flwr, ray or datasets."""

import os

for _var, _off in (
    ("FLWR_TELEMETRY_ENABLED", "0"),
    ("FLWR_DISABLE_UPDATE_CHECK", "1"),
    ("RAY_USAGE_STATS_ENABLED", "0"),
    ("RAY_USAGE_STATS_PROMPT_ENABLED", "0"),
    ("HF_HUB_DISABLE_TELEMETRY", "1"),
    ("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1"),
):
    os.environ.setdefault(_var, _off)
